"""Training runs: CMAPKD stages 1-4 (METHOD.md 5), the baselines and the ablations.

    cmapkd distill --run stage1 --out models/cmapkd-stage1-s0 --seed 0
    cmapkd distill --run stage2 --init models/cmapkd-stage1-s0 --out models/cmapkd-stage2-s0
    cmapkd distill --run kd --out models/kd-s1 --seed 1
    cmapkd distill --ablation p5only --out models/abl-p5only --main-chain models/cmapkd-stage{}-s0

Runs under torchrun too (`torchrun --nproc_per_node=N -m cmapkd.stages.distill --run stage1 ...`):
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
from cmapkd.distill.runs import CMAPKD_STAGES, RUNS, run, run_chain
from cmapkd.distill.trainer import NonFiniteLossError

KEYS = ["seed", "seeds", "ablations", "ablation_runs", "baselines", "setting", "lambda1", "lambda2", "lambda3", "lambda4", "model", "loss", "cache_teacher", "distill"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cmapkd distill", description=__doc__)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", choices=RUNS, help="one CMAPKD stage or one baseline")
    what.add_argument("--ablation", help="a variant of params.yaml `ablations` (runs its CMAPKD chain)")
    ap.add_argument("--seed", type=int, default=None, help="training seed (default: params seed)")
    ap.add_argument("--main-chain", default=None,
                    help="ablations: output folders of the main chain, with {} for the stage (e.g. models/cmapkd-{}-s0)")
    ap.add_argument("--data", default="data/processed/emojiscenes")
    ap.add_argument("--teacher", default="models/teacher")
    ap.add_argument("--cache", default="data/cache/teacher")
    ap.add_argument("--init", default=None, help="output folder of the previous stage")
    ap.add_argument("--student-init", default="models/student_init",
                    help="the student_init stage's folder: the student every run starts from ('' = bare build)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--metrics", default=None, help="also write the run's summary here (DVC metrics)")
    ap.add_argument("--scratch", default="scratch", help="resume checkpoints (git-ignored)")
    ap.add_argument("--live", default="dvclive", help="DVCLive folder (one subfolder per model, named like --out)")
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
        out = Path(args.out)
        live = Path(args.live) / out.name
        student_init = Path(args.student_init) if args.student_init else None
        if args.ablation is not None:
            if args.ablation not in params.ablations:
                raise ValueError(f"{args.params}: no ablation '{args.ablation}' under `ablations` "
                               f"(known: {sorted(params.ablations)})")
            main = {s: Path(args.main_chain.format(s)) for s in CMAPKD_STAGES} if args.main_chain else None
            summary = run_chain(params, args.ablation, params.ablations[args.ablation], Path(args.data),
                                Path(args.teacher), Path(args.cache), out, Path(args.scratch), live, device, main,
                                info, progress=not args.no_progress, student_init=student_init)
        else:
            summary = run(params, args.run, Path(args.data), Path(args.teacher), Path(args.cache),
                          Path(args.init) if args.init else None, out, Path(args.scratch), live,
                          device, info, progress=not args.no_progress, seed=args.seed, student_init=student_init)
        if args.metrics and info.is_main:
            Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
            Path(args.metrics).write_text(json.dumps(summary, indent=2, sort_keys=True))
    except (CacheMismatchError, NonFiniteLossError, DataError, ParamsError, FileNotFoundError, ValueError) as e:
        # (TeacherError, raised for a student_init folder that does not fit, is a ValueError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    runtime.run_stage(main)
