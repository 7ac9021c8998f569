"""Time `evaluate_model` (the evaluate stage's work, in one process) for the teacher and a
student-sized model, per part, and extrapolate to the default set of models.

    python benchmarks/bench_eval.py [--data data/processed/emojiscenes] [--teacher models/teacher]
                                    [--model models/<id> ...] [--students 30] [--threads N]

Without --model it evaluates a random-weight CMAPKD student (the student architecture of
params.yaml, written to a temporary folder as the training stages write it) twice: once running the
teacher for the figure arrays, once reusing the teacher's figure arrays (--teacher-figdata), and a
random scratch student (no figure arrays). The work does not depend on the weights (same shapes,
same operations), so random weights time a trained student faithfully. Target (issue 6): the
evaluation of the default models (teacher + 34 students) in under 3 minutes on 2 cores; the last
lines give it as in-process work and as one stage process per model (start-up included). Process start-up (imports, about 3-7 s per `python -m cmapkd.stages.evaluate`) is measured separately.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cmapkd.config import load_params
from cmapkd.eval import run as R

KEYS = ["seed", "setting", "model", "loss", "distill", "lambda1", "lambda2", "lambda3", "lambda4", "evaluate"]
PARTS = ("load", "retrieval", "zeroshot", "vqa_probe", "efficiency", "figdata", "total", "cpu")


def random_models(params, teacher_dir: Path, root: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    from cmapkd.distill.runs import build_method, save_state

    torch.manual_seed(0)
    method = build_method(params, "stage4b", None, R.teacher_dims_of(params, teacher_dir))
    out = {}
    for name, method_name in (("cmapkd-bench", "cmapkd"), ("scratch-bench", "scratch")):
        d = root / name
        d.mkdir(parents=True)
        if method_name == "cmapkd":
            save_state(method, d / R.MODEL_FILE)
        else:
            save_file({"student." + k: v.contiguous() for k, v in method.student.state_dict().items()},
                      str(d / R.MODEL_FILE))
        (d / R.SUMMARY_FILE).write_text(json.dumps({"run": name, "method": method_name, "seed": 0}))
        out[name] = d
    return out


def startup_seconds() -> tuple[float, float]:
    """(wall, CPU) seconds of a process that only imports what the stage imports."""
    code = ("import torch, open_clip, transformers, timm; import cmapkd.eval.run, cmapkd.distill.runs, "
            "cmapkd.distill.teacher")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


metrics_rows: list[tuple[str, dict]] = []


def timed(rows: list, label: str, *args, **kwargs):
    """evaluate_model with per-part wall times plus the process's CPU seconds ('cpu')."""
    t: dict = {}
    c0 = time.process_time()
    out = R.evaluate_model(*args, timings=t, **kwargs)
    t["cpu"] = time.process_time() - c0
    rows.append((label, t))
    metrics_rows.append((label, out[0]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/processed/emojiscenes")
    ap.add_argument("--teacher", default="models/teacher")
    ap.add_argument("--model", action="append", default=[], help="model folders to time (default: random students)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--students", type=int, default=34,
                    help="student models of the default pipeline (extrapolation): 3 CMAPKD + 3 stage + 21 baseline + 7 ablation")
    ap.add_argument("--cmapkd", type=int, default=3, help="of those, final CMAPKD models (they write figure arrays)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-teacher", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(KEYS, path=args.params)
    fig_n = params.evaluate.figure_samples
    rows: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher_fig = None
        if not args.skip_teacher:
            _, fig = timed(rows, "teacher", params, args.teacher, args.data, args.teacher, "cpu", fig_n, False)
            teacher_fig = tmp / "teacher.npz"
            R.save_figdata(teacher_fig, fig)
        if args.model:
            targets = [(Path(m).name, Path(m), None) for m in args.model]
        else:
            m = random_models(params, Path(args.teacher), tmp)
            targets = [("cmapkd (runs teacher)", m["cmapkd-bench"], None),
                       ("cmapkd (reuses teacher npz)", m["cmapkd-bench"], teacher_fig),
                       ("scratch / baseline", m["scratch-bench"], None)]
        for label, path, tf in targets:
            if tf is None and label.endswith("npz)"):
                continue
            timed(rows, label, params, path, args.data, args.teacher, "cpu", fig_n, False, teacher_figdata=tf)
    start, start_cpu = startup_seconds()

    print(f"evaluate_model on {args.data}, CPU, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; seconds")
    width = max(len(r[0]) for r in rows)
    print(f"{'model':<{width}}  " + "  ".join(f"{p:>10}" for p in PARTS))
    for label, t in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{t.get(p, 0.0):>10.1f}" for p in PARTS))
    print(f"process start-up (imports) per stage call: {start:.1f} s wall, {start_cpu:.1f} s CPU")
    print("quality of the timed models (a check that they were evaluated; the bench students have random weights):")
    for label, m in metrics_rows:
        vqa = "  ".join(f"{k[len('vqa_probe_'):]} {m[k]:.3f}" for k in R.VQA_KEYS if k in m)
        print(f"  {label:<{width}}  retrieval_mean {m['retrieval_mean']:.3f}  VQA probe: {vqa}")
    t = {label: t for label, t in rows}
    if not args.model and "scratch / baseline" in t:
        teacher = t.get("teacher", {"total": 0.0, "cpu": 0.0})
        cmapkd = t.get("cmapkd (reuses teacher npz)", t["cmapkd (runs teacher)"])
        other = t["scratch / baseline"]
        n_other = args.students - args.cmapkd
        for what, key, boot in (("wall", "total", start), ("CPU", "cpu", start_cpu)):
            work = teacher[key] + args.cmapkd * cmapkd[key] + n_other * other[key]
            procs = work + (args.students + 1) * boot
            print(f"teacher + {args.cmapkd} CMAPKD + {n_other} other students, {what} seconds: evaluation work "
                  f"{work:.0f} s ({work / 60:.1f} min); as {args.students + 1} stage processes (+ start-up) "
                  f"{procs:.0f} s ({procs / 60:.1f} min)")
        print("(with one thread on a busy machine, CPU seconds are what an idle core would take in wall time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
