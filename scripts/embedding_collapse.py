"""How collapsed a model's final image embeddings are: the mean pairwise cosine similarity of the
embeddings of the first N validation images (1.0 = every image maps to the same direction).

    python scripts/embedding_collapse.py models/cmapkd-s0 models/scratch-s0 models/clipkd-s0 [--random-init]

The README's "Known limits" quotes these numbers (default run, N = 64). `--random-init` adds the
student architecture of params.yaml with its random initial weights (torch seed 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from cmapkd.config import load_params
from cmapkd.data import ImageTextDataset
from cmapkd.eval.run import embed_images, load_model
from cmapkd.models.encoders import build_encoder


def mean_pairwise_cosine(emb: torch.Tensor) -> float:
    e = F.normalize(emb.float(), dim=-1)
    sim = e @ e.t()
    return float(sim[~torch.eye(len(e), dtype=torch.bool)].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="model folders written by the training stages")
    ap.add_argument("--random-init", action="store_true", help="also the random-init student")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--data", default="data/processed/emojiscenes")
    ap.add_argument("--teacher", default="models/teacher")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(path=args.params)
    val = ImageTextDataset(Path(args.data), "val")
    rows = list(range(min(args.images, len(val))))
    cpu = torch.device("cpu")
    encoders = []
    if args.random_init:
        torch.manual_seed(0)
        encoders.append(("random-init student", build_encoder(params.model.student).eval()))
    for m in args.models:
        encoders.append((Path(m).name, load_model(params, m, args.teacher, cpu).encoder))
    for name, enc in encoders:
        with torch.inference_mode():
            emb = embed_images(enc, val.images, 256, cpu, rows)
        print(f"{name}: mean pairwise cosine of {len(rows)} val image embeddings {mean_pairwise_cosine(emb):.3f}")


if __name__ == "__main__":
    main()
