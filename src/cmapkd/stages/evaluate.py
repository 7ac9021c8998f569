"""`evaluate` stage: retrieval (test split), zero-shot classification, the VQA probe and efficiency
of one model (a training run's folder or models/teacher), written as one flat metrics JSON, plus the
figure arrays of a CMAPKD model or the teacher (docs/evaluation.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cmapkd import runtime
from cmapkd.config import PARAMS_FILE, ParamsError, load_params

log = logging.getLogger("cmapkd.evaluate")

# params the stage reads (declare the same list in dvc.yaml); loss/distill/lambdas rebuild a CMAPKD model
KEYS = ["seed", "setting", "model", "loss", "distill", "lambda1", "lambda2", "lambda3", "lambda4", "evaluate"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cmapkd evaluate", description=__doc__)
    ap.add_argument("--model", required=True,
                    help="model folder: models/<id> (model.safetensors + summary.json), models/teacher, "
                         "models/student_init, or 'random' (the student architecture with random weights)")
    ap.add_argument("--data", default="data/processed/emojiscenes", help="processed dataset (prepare's output)")
    ap.add_argument("--teacher", default="models/teacher", help="the teacher stage's folder")
    ap.add_argument("--out", required=True, help="metrics JSON, e.g. reports/metrics/<id>.json")
    ap.add_argument("--figdata", default=None, help="figure arrays (.npz), written for CMAPKD models and the teacher")
    ap.add_argument("--teacher-figdata", default=None,
                    help="the teacher's figdata .npz: a CMAPKD model reuses its teacher arrays when they match")
    ap.add_argument("--ranks", default=None, help="per-query retrieval ranks (.npz) for paired comparisons")
    ap.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a params key")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    runtime.setup_logging()
    from cmapkd.data import DataError
    from cmapkd.distill.teacher import TeacherError
    from cmapkd.eval.run import EvaluationError, evaluate_model, save_figdata, write_metrics

    times: dict[str, float] = {}
    ranks: dict = {}
    try:
        params = load_params(KEYS, path=args.params, overrides=args.set)
        runtime.configure_hub(params.setting)
        runtime.seed_everything(params.seed)
        device = runtime.get_device()
        metrics, figdata = evaluate_model(params, args.model, args.data, args.teacher, device,
                                          figure_samples=params.evaluate.figure_samples,
                                          progress=not args.no_progress, teacher_figdata=args.teacher_figdata,
                                          timings=times, figures=bool(args.figdata), ranks_out=ranks)
    except (ParamsError, EvaluationError, TeacherError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_metrics(args.out, metrics)
    if args.ranks:
        save_figdata(args.ranks, ranks)  # the same deterministic .npz writer
    if args.figdata:
        if figdata is not None:
            save_figdata(args.figdata, figdata)
            log.info("wrote %s (%d samples)", args.figdata, len(figdata["sample_index"]))
        else:
            Path(args.figdata).unlink(missing_ok=True)  # never leave another run's arrays behind
            log.info("%s: no figure arrays for method %r (CMAPKD models and the teacher only)", args.figdata,
                     metrics["method"])
    log.info("%s (%s): retrieval mean %.3f (i2t R@1 %.3f, t2i R@1 %.3f), VQA probe %.3f, %s",
             metrics["model"], metrics["method"], metrics["retrieval_mean"], metrics["retrieval_i2t_r1"],
             metrics["retrieval_t2i_r1"], metrics["vqa_probe_overall"],
             ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("zeroshot_") and k.endswith("_top1")))
    log.info("wrote %s in %.1f s (%s)", args.out, times.get("total", 0.0),
             ", ".join(f"{k} {v:.1f} s" for k, v in times.items() if k != "total"))
    return 0


if __name__ == "__main__":
    runtime.run_stage(main)
