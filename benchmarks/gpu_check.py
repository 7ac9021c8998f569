"""The GPU check of the paper setting: what one GPU does with ViT-L-14 -> ViT-B-16 (issue 16).

    bash scripts/gpu_check.sh [--batch-size 64] [--steps 10] [--warmup 3] [--cache-batches 4]
                              [--device cuda|cpu] [--random-weights]

Builds the paper pair of `configs/paper.yaml` (over params.yaml): the open_clip ViT-L-14 teacher
and ViT-B-16 student with their pretrained tags when the model hub can be reached, random weights
otherwise (the output says which, and why), and measures, on one device, with bf16 autocast on
CUDA and the training loop's AdamW + gradient clipping:

- `plain`:  an open_clip contrastive step of the student alone (the Scratch baseline: ClipLoss);
- `cached`: a CMAPKD step (all levels, uniform weights: stage 3) with the teacher targets computed
  beforehand, as the `cache_teacher` stage stores them (fp16) and the stages read them;
- `online`: the same CMAPKD step with the frozen teacher's forward pass inside the step;

samples/s (median over `--steps` timed steps after `--warmup`) and peak memory
(`torch.cuda.max_memory_allocated`) of each, and the teacher-cache write rate: images/s of the
teacher's forward pass plus fp16 safetensors shard writes (`CacheWriter`, as `cache_teacher`).

Inputs are real photos shipped with scikit-image (`cmapkd.sample_photos`), with captions written
for them, randomly cropped and resized to 224 px. It is a throughput check, so what the photos show does not
matter; they stand in for COCO batches of the same shape.

Without a GPU it says so and exits 0. `--device cpu` runs the same code on the CPU (slowly: with
`--batch-size 2 --steps 1 --warmup 0` about a minute on 2 cores), which is how the test suite keeps
it from rotting. On one H100/H200-class GPU the default run should take about 2-4 minutes (an
estimate: it has not run on a GPU yet), most of it
building the models (and downloading ~1.7 GB of weights the first time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

def paper_params(random_weights: bool):
    """params.yaml with configs/paper.yaml merged over it (the paper setting), as typed Params."""
    from cmapkd.config import load_params

    random = ["model.teacher.pretrained=''", "model.student.pretrained=''"] if random_weights else []
    return load_params(path=ROOT / "params.yaml", overlay=ROOT / "configs" / "paper.yaml", overrides=random)


def build_pair(params, random_weights: bool):
    """(distiller with the online teacher, what weights it has): pretrained tags first, random
    weights when they cannot be loaded (no hub, no network)."""
    from cmapkd.distill.cmapkd import CMAPKDDistiller

    if not random_weights:
        try:
            d = CMAPKDDistiller.from_params(params, teacher_online=True)
            t, s = params.model.teacher, params.model.student
            return d, f"pretrained: teacher {t.open_clip_model} '{t.pretrained}', student {s.open_clip_model} '{s.pretrained}'"
        except Exception as e:  # noqa: BLE001 - any hub/network/file failure falls back, and is said
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
            params = paper_params(random_weights=True)
            return CMAPKDDistiller.from_params(params, teacher_online=True), f"RANDOM weights (pretrained ones failed to load: {why})"
    return CMAPKDDistiller.from_params(params, teacher_online=True), "RANDOM weights (--random-weights)"


def photo_batch(n: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n random crops of the packaged photos (`cmapkd.sample_photos`), uint8 [n, 3, size, size], and
    a caption of each."""
    from cmapkd.sample_photos import PHOTOS, load_photo, random_crop

    rng = np.random.default_rng(seed)
    photos = [load_photo(p) for p in PHOTOS]
    crops = [random_crop(photos[i % len(PHOTOS)], rng, size) for i in range(n)]
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return images, [PHOTOS[i % len(PHOTOS)].captions[0] for i in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_steps(method, make_batch, device: torch.device, steps: int, warmup: int, lr: float = 1e-5) -> dict:
    """Median samples/s of `steps` training steps after `warmup`, and the peak memory."""
    groups = [g for g in method.param_groups({g: lr for g in method.group_names}) if g["lr"] > 0]
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.05)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    method.train()
    times, n = [], 0
    for i in range(warmup + steps):
        batch = make_batch()
        n = batch["images"].shape[0]
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses = method.compute_losses(method.compute_features(batch))
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        float(losses["total"].detach())  # the loop logs every term: one host sync per step
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if not torch.isfinite(losses["total"]):
            raise FloatingPointError(f"non-finite loss at step {i + 1}")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del opt
    return {"samples_s": n / statistics.median(times), "ms_step": 1000 * statistics.median(times), "peak_gib": peak}


def measure_cache_writes(distiller, images: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Images/s of the teacher's forward pass + fp16 safetensors shards (the cache_teacher path)."""
    from cmapkd.distill.cache import CacheWriter
    from cmapkd.models.ucmp import compute_teacher_targets

    teacher, grids = distiller.teacher, distiller.student_grids()
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        writer = CacheWriter(Path(tmp) / "cache", {"gpu_check": True}, shard_rows=max(1, len(images)))
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            compute_teacher_targets(teacher, images[:batch_size].to(device), student_grids=grids)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for start in range(0, len(images), batch_size):
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                t = compute_teacher_targets(teacher, images[start : start + batch_size].to(device), student_grids=grids)
            writer.writer("image-v0").add(t)
        writer.commit()
        _sync(device)
        return len(images) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cache-batches", type=int, default=4, help="batches written in the cache-rate check")
    ap.add_argument("--device", default="cuda", help="cuda (default; exits 0 with a message when there is none) | cpu")
    ap.add_argument("--random-weights", action="store_true", help="skip the pretrained tags (no download)")
    args = ap.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no GPU here (torch {torch.__version__}, torch.cuda.is_available() is False): nothing "
              f"measured. Run it on a machine with a CUDA GPU after `make setup`; `--device cpu` runs the same "
              f"code on the CPU as a smoke test.")
        return 0
    device = torch.device(args.device)

    from cmapkd import runtime
    from cmapkd.distill.baselines import build_baseline

    runtime.setup_logging()
    runtime.configure_hub("paper")
    torch.manual_seed(0)
    what = device.type if device.type != "cuda" else f"cuda: {torch.cuda.get_device_name(device)}"
    print(f"gpu_check on {what}, torch {torch.__version__}, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup}, bf16 autocast: {device.type == 'cuda'}", flush=True)

    params = paper_params(args.random_weights)
    t0 = time.perf_counter()
    d, weights = build_pair(params, args.random_weights)
    d.to(device)
    print(f"models: {weights}; built in {time.perf_counter() - t0:.0f} s", flush=True)

    size = d.student.image.image_size
    images, captions = photo_batch(args.batch_size * max(1, args.cache_batches), size, seed=0)
    ids, mask = d.student.tokenize(captions[: args.batch_size])
    pick = torch.Generator().manual_seed(0)

    def batch():
        rows = torch.randperm(len(images), generator=pick)[: args.batch_size]
        return {"images": images[rows].to(device), "text_ids": ids.to(device), "text_mask": mask.to(device)}

    targets_batch = batch()
    targets = {k: v.half() for k, v in d.teacher_targets(targets_batch["images"], targets_batch["text_ids"],
                                                          targets_batch["text_mask"]).items()}  # as the cache stores them
    d.set_levels([1, 2, 3, 4], [1, 2, 3, 4])
    d.set_phase("distill")
    results = {}
    plain = build_baseline("scratch", params, d.student)
    results["plain (open_clip ClipLoss, student only)"] = measure_steps(plain, batch, device, args.steps, args.warmup)
    results["cached (CMAPKD step, cached fp16 targets)"] = measure_steps(
        d, lambda: {**targets_batch, **targets}, device, args.steps, args.warmup)
    results["online (CMAPKD step + teacher forward)"] = measure_steps(d, batch, device, args.steps, args.warmup)
    cache_rate = measure_cache_writes(d, images, args.batch_size, device)

    print("\n| step | samples/s | ms/step | peak memory (GiB) |\n|---|--:|--:|--:|")
    for name, r in results.items():
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] == r["peak_gib"] else "n/a (CPU)"
        print(f"| {name} | {r['samples_s']:.1f} | {r['ms_step']:.0f} | {peak} |")
    base = results["plain (open_clip ClipLoss, student only)"]["samples_s"]
    cached = results["cached (CMAPKD step, cached fp16 targets)"]["samples_s"]
    online = results["online (CMAPKD step + teacher forward)"]["samples_s"]
    print(f"\ncached / plain: {cached / base:.2f}x samples/s; online / plain: {online / base:.2f}x")
    print(f"teacher cache write rate: {cache_rate:.1f} images/s (teacher forward + fp16 shards, "
          f"{len(images)} images in batches of {args.batch_size})")
    print(f"weights: {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
