"""The paper setting's CPU smoke run (issue 16), the two steps `bash scripts/paper_smoke.sh` runs
around `dvc repro` in a copy of the project:

- `python -m cmapkd.paper_smoke inputs DIR` writes what configs/paper_smoke.yaml points at:
  public-format data from scikit-image's sample photos (`cmapkd.sample_photos`: COCO Karpathy,
  ImageNet val tree, VQAv2) and the "pretrained" checkpoints of the two tiny open_clip ViTs, as
  safetensors files that `open_clip.create_model(pretrained=<file>)` loads the way it loads a
  downloaded tag. The weights are seeded random ones: the run proves the code path, not a result.
- `python -m cmapkd.paper_smoke check DIR` fails unless every stage's result is there: one metrics
  JSON per model the params ask for, Tables 2-5 with every row and a number in every quality cell,
  and every figure.

Not a DVC dependency: nothing the stages import imports this module.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

INPUTS = "smoke_inputs"
# open_clip architectures of configs/paper_smoke.yaml (src/cmapkd/model_configs)
ARCHS = {"teacher": "CMAPKD-Small-8-64", "student": "CMAPKD-Tiny-8-64"}
FIGURES = ("fig3_alsn_weights", "fig4_alsn_radar", "fig5_tsne_levels", "fig6_crossmodal_sim")


def write_inputs(root: str | Path, crops_per_photo: int = 12, seed: int = 0) -> dict[str, Path]:
    """Data and checkpoints under `root/smoke_inputs`; returns their paths."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from cmapkd.models.encoders import register_model_configs
    from cmapkd.sample_photos import write_public_formats

    base = Path(root) / INPUTS
    paths = write_public_formats(base, crops_per_photo=crops_per_photo, size=128, seed=seed)
    register_model_configs()
    for i, (role, arch) in enumerate(ARCHS.items()):
        torch.manual_seed(seed + i)
        model = open_clip.create_model(arch)
        path = base / "weights" / f"{role}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        paths[f"{role}_weights"] = path
    return paths


def expected_models(params) -> list[str]:
    """Every metrics JSON name (reports/metrics/<name>.json) the DAG writes for these params."""
    seeds = params.seeds
    names = ["teacher", "student_init", "random"]
    names += [f"cmapkd-s{s}" for s in seeds]
    names += [f"{m}-s{s}" for m in params.baselines.methods for s in seeds]
    names += [f"abl-{a}" for a in params.ablation_runs]
    names += [f"cmapkd-{st}-s{params.seed}" for st in params.stage_evals]
    return names


def expected_rows(params) -> dict[str, list[str]]:
    """The `model` column of each of Tables 2-5 (report/tables.py), in order."""
    students = [*params.baselines.methods, "cmapkd"]
    return {
        "table2": ["teacher", "student_init", *students],
        "table3": ["teacher", "student_init", "random", *students],
        "table4": ["cmapkd", *(f"cmapkd-{s}" for s in params.stage_evals), *(f"abl-{a}" for a in params.ablation_runs)],
        "table5": ["teacher", "student_init", *students],
    }


# columns that are empty by design: spreads of single-seed rows, the teacher's own reduction/speedup,
# Scratch's and the references' difference to Scratch
OPTIONAL = ("_std", "params_reduction_pct", "speedup_x", "delta_mean")


def check_outputs(root: str | Path) -> list[str]:
    """Problems with the results of a finished run in `root` (empty: all there)."""
    from cmapkd.config import load_params

    root = Path(root)
    params = load_params(path=root / "params.yaml")
    problems = []
    for name in expected_models(params):
        if not (root / "reports" / "metrics" / f"{name}.json").is_file():
            problems.append(f"reports/metrics/{name}.json missing")
    for table, models in expected_rows(params).items():
        path = root / "reports" / "tables" / f"{table}.csv"
        if not path.is_file():
            problems.append(f"reports/tables/{table}.csv missing")
            continue
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        got = [r["model"] for r in rows]
        if got != models:
            problems.append(f"reports/tables/{table}.csv: rows {got}, expected {models}")
        for row in rows:
            for col, cell in row.items():
                if col in ("block", "model", "method", "role", "seeds") or col.endswith(OPTIONAL) or col.startswith(OPTIONAL):
                    continue
                try:
                    ok = math.isfinite(float(cell))
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    problems.append(f"reports/tables/{table}.csv: row {row['model']!r}, column {col!r} is {cell!r}, not a number")
    figures = root / "reports" / "figures"
    for fig in FIGURES:
        for ext in ("png", "pdf"):
            if not (figures / f"{fig}.{ext}").is_file():
                problems.append(f"reports/figures/{fig}.{ext} missing")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cmapkd.paper_smoke", description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["inputs", "check"])
    ap.add_argument("dir", nargs="?", default=".", help="the project copy the smoke run works in")
    args = ap.parse_args(argv)
    if args.step == "inputs":
        for key, path in write_inputs(args.dir).items():
            print(f"{key}: {path}")
        return 0
    problems = check_outputs(args.dir)
    for p in problems:
        print(f"paper smoke: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"paper smoke: every metrics file, table row and figure is there ({Path(args.dir).resolve()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
