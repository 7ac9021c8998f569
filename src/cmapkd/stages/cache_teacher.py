"""`cache_teacher` stage: the frozen teacher's targets for K seeded views of every training image
and for every training caption, as fp16 safetensors shards with the teacher's and the data's
identity (METHOD.md section 6). Distillation stages read them instead of running the teacher."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cmapkd import runtime
from cmapkd.config import ParamsError, load_params
from cmapkd.data import DataError, ImageTextDataset
from cmapkd.distill.batches import TokenizedCaptions, cache_identity
from cmapkd.distill.cache import CacheWriter
from cmapkd.distill.teacher import load_teacher
from cmapkd.distill.views import make_views
from cmapkd.models.towers import length_batches
from cmapkd.models.ucmp import compute_teacher_targets, pyramid_grids

log = logging.getLogger("cmapkd.cache_teacher")


def build_cache(params, data_root: Path, teacher_dir: Path, out: Path, device: torch.device, progress: bool = True) -> dict:
    cfg = params.cache_teacher
    if cfg.num_views < 1 or cfg.batch_size < 1 or cfg.shard_rows < 1:
        raise ParamsError("params.yaml: cache_teacher.num_views, batch_size and shard_rows must be >= 1")
    teacher = load_teacher(params.model, teacher_dir).to(device)
    dataset = ImageTextDataset(data_root, "train")
    grids = pyramid_grids(params.model.student.image_size)
    identity = cache_identity(teacher.identity(), data_root, "train", params.model.student.image_size,
                              cfg.num_views, params.seed)
    writer = CacheWriter(out, identity, shard_rows=cfg.shard_rows)
    n = len(dataset)
    forward_s, t_start = 0.0, time.perf_counter()
    bar = tqdm(total=n * cfg.num_views, desc="cache_teacher images", unit="img", disable=not progress)
    with torch.inference_mode():
        for k in range(cfg.num_views):
            for start in range(0, n, cfg.batch_size):
                rows = list(range(start, min(n, start + cfg.batch_size)))
                raw = torch.from_numpy(np.ascontiguousarray(dataset.images[np.asarray(rows)])).permute(0, 3, 1, 2)
                views = make_views(raw, rows, k, params.seed).to(device)
                t0 = time.perf_counter()
                targets = compute_teacher_targets(teacher, views, student_grids=grids)
                forward_s += time.perf_counter() - t0
                writer.writer(f"image-v{k}").add(targets)
                bar.update(len(rows))
        bar.close()
        captions = TokenizedCaptions(dataset, teacher.tokenize)
        m = len(captions.ids)
        bar = tqdm(total=m, desc="cache_teacher captions", unit="cap", disable=not progress)
        chunk = cfg.batch_size * 16
        for start in range(0, m, chunk):
            ids, mask = captions.ids[start : start + chunk], captions.mask[start : start + chunk]
            # batches of similar length inside the chunk, written back in caption order
            batches, inverse = length_batches(mask, cfg.batch_size)
            t0 = time.perf_counter()
            parts = [compute_teacher_targets(teacher, text_ids=ids[sel].to(device), text_mask=mask[sel].to(device))
                     for sel in batches]
            forward_s += time.perf_counter() - t0
            writer.writer("text").add({k: torch.cat([p[k] for p in parts])[inverse] for k in parts[0]})
            bar.update(len(ids))
        bar.close()
    total_s = time.perf_counter() - t_start
    samples = n * cfg.num_views + m
    record = writer.commit(
        {
            "timing": {
                "teacher_forward_s": round(forward_s, 3),
                "total_s": round(total_s, 3),
                "samples": samples,
                "forward_samples_per_s": round(samples / max(forward_s, 1e-9), 1),
                "cache_samples_per_s": round(samples / max(total_s, 1e-9), 1),
                "device": str(device),
            }
        }
    )
    per_image = record["bytes"] / max(1, n * cfg.num_views + m)
    log.info("cache: %d images x %d views + %d captions, %.1f MB (%.1f kB per cached row), teacher forward %.0f/s, end-to-end %.0f/s",
             n, cfg.num_views, m, record["bytes"] / 1e6, per_image / 1e3,
             record["timing"]["forward_samples_per_s"], record["timing"]["cache_samples_per_s"])
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cmapkd cache_teacher", description=__doc__)
    ap.add_argument("--data", default="data/processed/emojiscenes")
    ap.add_argument("--teacher", default="models/teacher")
    ap.add_argument("--out", default="data/cache/teacher")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    runtime.setup_logging()
    try:
        params = load_params(["seed", "setting", "model", "cache_teacher"], path=args.params)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runtime.configure_hub(params.setting)
    runtime.seed_everything(params.seed)
    try:
        build_cache(params, Path(args.data), Path(args.teacher), Path(args.out), runtime.get_device(), not args.no_progress)
    except (DataError, ParamsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    runtime.run_stage(main)
