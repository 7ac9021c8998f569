"""`tables` stage: Tables 2-7 of the paper (retrieval; zero-shot + VQA probe; ablations and the
progressive stages; efficiency; retrieval by scene type and object size, and CMAPKD's paired
differences there) from the metrics JSONs and per-query ranks of the evaluate stage and the test
manifest, as Markdown, LaTeX (booktabs) and CSV: reports/tables/table{2..7}.{md,tex,csv}
(docs/reports.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cmapkd import runtime
from cmapkd.config import PARAMS_FILE, ParamsError, load_params

log = logging.getLogger("cmapkd.tables")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cmapkd tables", description=__doc__)
    ap.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a params key")
    ap.add_argument("--metrics", default="reports/metrics", help="folder of <model_id>.json metrics (evaluate's output)")
    ap.add_argument("--out", default="reports/tables", help="output folder (table2..table5 .md/.tex/.csv)")
    ap.add_argument("--ranks", default=None, help="per-query ranks folder (evaluate's --ranks): Table 2's delta vs Scratch, Tables 6-7")
    ap.add_argument("--data", default=None, help="prepared dataset folder: its manifest-test.jsonl gives Tables 6-7 their subsets")
    args = ap.parse_args(argv)
    runtime.setup_logging()
    from cmapkd.report.tables import ReportError, write_tables

    try:
        params = load_params(["seed", "seeds", "ablation_runs", "stage_evals", "prepare", "report", "baselines"],
                             path=args.params, overrides=args.set)
        summary = write_tables(args.metrics, args.out, params.report.headline_metric, params.prepare.format,
                               seeds=params.seeds, ablations=params.ablation_runs,
                               stages=params.stage_evals, ranks_dir=args.ranks, methods=params.baselines.methods,
                               imagenet_templates=params.prepare.paper.imagenet_templates,
                               test_manifest=Path(args.data) / "manifest-test.jsonl" if args.data else None)
    except (ParamsError, ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for group, d in summary["deltas"].items():
        log.info("mean recall %s - scratch: %+.2f points [95%% CI %+.2f, %+.2f]", group, 100 * d.diff, 100 * d.lo, 100 * d.hi)
    for number, rows in summary["rows"].items():
        shown = ", ".join(f"{g} (n={n})" for g, n in rows) or "no rows"
        log.info("table %d: %s", number, shown)
    log.info("wrote %d files to %s", len(summary["files"]), Path(args.out))
    return 0


if __name__ == "__main__":
    runtime.run_stage(main)
