"""Compare VQA-probe recipes on trained models (the table in docs/evaluation.md, "VQAv2 probe").

    python benchmarks/compare_vqa_probes.py [models/scratch-s1 models/kd-s1 models/cmapkd-s0 models/clipkd-s0 ...]

For each model folder (after `dvc repro`), trains the probe of `cmapkd.eval.run.vqa_probe_metrics`
with each recipe below (params.yaml's `evaluate.vqa_probe` with the listed keys replaced) and prints
overall / yes-no accuracy (%) and the seconds the VQA part took (embeddings included). A benchmark,
not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from cmapkd.config import load_params
from cmapkd.eval import run as R

KEYS = ["seed", "setting", "model", "loss", "distill", "lambda1", "lambda2", "lambda3", "lambda4", "evaluate"]
RECIPES = {
    "256/1000, 20 ep, 1e-2": dict(hidden=256, train_images=1000, epochs=20, lr=1e-2),
    "128/1000, 20 ep, 1e-2": dict(hidden=128, train_images=1000, epochs=20, lr=1e-2),
    "128/800, 20 ep, 1e-2": dict(hidden=128, train_images=800, epochs=20, lr=1e-2),
    "256/1000, 10 ep, 2e-2": dict(hidden=256, train_images=1000, epochs=10, lr=2e-2),
}
DEFAULT_MODELS = ["models/scratch-s1", "models/kd-s1", "models/cmapkd-s0", "models/clipkd-s0"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("--data", default="data/processed/emojiscenes")
    ap.add_argument("--teacher", default="models/teacher")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(KEYS, path=args.params)
    ev = params.evaluate
    print("| model | " + " | ".join(RECIPES) + " |")
    print("|---|" + "---|" * len(RECIPES))
    for path in args.models:
        model = R.load_model(params, path, args.teacher).encoder
        cells = []
        for recipe in RECIPES.values():
            probe = dataclasses.replace(ev.vqa_probe, **recipe)
            t0 = time.perf_counter()
            m = R.vqa_probe_metrics(model, args.data, probe, ev.batch_size, torch.device("cpu"))
            cells.append(f"{100 * m['vqa_probe_overall']:.1f} / {100 * m['vqa_probe_yes_no']:.1f} "
                         f"({time.perf_counter() - t0:.1f} s)")
        print(f"| {path.rstrip('/').split('/')[-1]} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
