"""`teacher` stage: train the embedded teacher's heads (final and per-level projections of both
towers + logit scale) on the train split with frozen towers, or, in the paper setting, record the
pretrained open_clip teacher as it is; write models/teacher/{teacher.safetensors, spec.json} and
the teacher's val retrieval before/after training (docs/teacher.md).

`--role student` is the `student_init` stage: the same routine aligns the student's heads on its
own frozen pretrained towers (`student_init` params) and writes models/student_init/."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cmapkd import runtime
from cmapkd.config import PARAMS_FILE, ParamsError, load_params

log = logging.getLogger("cmapkd.teacher")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cmapkd teacher", description=__doc__)
    ap.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a params key")
    ap.add_argument("--data", default="data/processed/emojiscenes", help="processed dataset (prepare's output)")
    ap.add_argument("--out", default="models/teacher", help="output folder (teacher.safetensors, spec.json)")
    ap.add_argument("--metrics", default="reports/teacher/metrics.json", help="metrics JSON ('' = none)")
    ap.add_argument("--role", choices=["teacher", "student"], default="teacher",
                    help="teacher: model.teacher with `teacher` params; student: model.student with `student_init`")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    runtime.setup_logging()
    from cmapkd.distill.teacher import TeacherError, run_teacher_stage

    try:
        section = "teacher" if args.role == "teacher" else "student_init"
        params = load_params(["seed", "setting", "model", section], path=args.params, overrides=args.set)
        runtime.configure_hub(params.setting)
        runtime.seed_everything(params.seed)
        m = run_teacher_stage(params, args.data, args.out, args.metrics or None, progress=not args.no_progress,
                              role=args.role)
    except (ParamsError, TeacherError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fmt = lambda d: " ".join(f"{k.removeprefix('retrieval_')}={v:.3f}" for k, v in d.items())  # noqa: E731
    if "val_random_heads" in m:
        log.info("val retrieval, random heads: %s", fmt(m["val_random_heads"]))
    log.info("val retrieval: %s", fmt(m["val"]))
    log.info("wrote %s in %.1f s (%s)", Path(args.out), m["time_s"]["total"],
             ", ".join(f"{k} {v:.1f} s" for k, v in m["time_s"].items() if k != "total"))
    return 0


if __name__ == "__main__":
    runtime.run_stage(main)
