"""Time recall_at_k at COCO 5k-test scale: 5,000 images x 25,000 captions, 512-d random embeddings.

    python benchmarks/bench_eval_metrics.py [--images 5000] [--captions-per-image 5] [--dim 512]
"""

from __future__ import annotations

import argparse
import time

import torch

from cmapkd.eval.retrieval import recall_at_k


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--captions-per-image", type=int, default=5)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = ap.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    img = torch.randn(args.images, args.dim, generator=g)
    t2i = torch.arange(args.images).repeat_interleave(args.captions_per_image)
    txt = img[t2i] + 8.0 * torch.randn(len(t2i), args.dim, generator=g)
    start = time.perf_counter()
    metrics = recall_at_k(img, txt, t2i, chunk_size=args.chunk_size, dtype=getattr(torch, args.dtype))
    elapsed = time.perf_counter() - start
    print(f"{args.images} images x {len(t2i)} captions, dim {args.dim}, {args.dtype}, "
          f"{torch.get_num_threads()} threads: {elapsed:.2f} s")
    print(metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
