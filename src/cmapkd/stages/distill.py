"""Distillation stages 1-4 (METHOD.md 5) and the scratch baseline: `cmapkd distill --run stage1`.

Runs under torchrun too (`torchrun --nproc_per_node=N -m cmapkd.stages.distill --run stage1`):
the global batch is split over the ranks and only rank 0 writes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cmapkd import runtime
from cmapkd.config import ParamsError, load_params
from cmapkd.data import DataError
from cmapkd.distill.cache import CacheMismatchError
from cmapkd.distill.ddp import init_distributed, shutdown_distributed
from cmapkd.distill.runs import RUNS, run
from cmapkd.distill.trainer import NonFiniteLossError

KEYS = ["seed", "setting", "lambda1", "lambda2", "lambda3", "lambda4", "model", "loss", "cache_teacher", "distill"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cmapkd distill", description=__doc__)
    ap.add_argument("--run", required=True, choices=RUNS)
    ap.add_argument("--data", default="data/processed/emojiscenes")
    ap.add_argument("--teacher", default="models/teacher")
    ap.add_argument("--cache", default="data/cache/teacher")
    ap.add_argument("--init", default=None, help="output folder of the previous stage")
    ap.add_argument("--out", required=True)
    ap.add_argument("--metrics", default=None, help="also write the run's summary here (DVC metrics)")
    ap.add_argument("--scratch", default="scratch", help="resume checkpoints (git-ignored)")
    ap.add_argument("--live", default="dvclive", help="DVCLive folder (one subfolder per run)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    runtime.setup_logging()
    try:
        params = load_params(KEYS, path=args.params)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runtime.configure_hub(params.setting)
    runtime.seed_everything(params.seed)
    device = runtime.get_device()
    info = init_distributed(device)
    try:
        summary = run(params, args.run, Path(args.data), Path(args.teacher), Path(args.cache),
                      Path(args.init) if args.init else None, Path(args.out), Path(args.scratch), Path(args.live),
                      device, info, progress=not args.no_progress)
        if args.metrics and info.is_main:
            Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
            Path(args.metrics).write_text(json.dumps(summary, indent=2, sort_keys=True))
    except (CacheMismatchError, NonFiniteLossError, DataError, ParamsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
