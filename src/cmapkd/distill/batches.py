"""Training batches for every method: student inputs plus teacher targets (cached or online).

For dataset row `i` in epoch `e`, the caption and the view are drawn from
`numpy.random.default_rng([seed, e, i])`, so a batch is a pure function of (seed, epoch, rows):
resume and multi-process runs see exactly the same samples. The view index selects the cached
teacher targets that belong to that exact view (METHOD.md section 6).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cmapkd.data import ImageTextDataset, read_info
from cmapkd.distill.cache import CacheReader
from cmapkd.distill.views import make_views
from cmapkd.models.ucmp import IMAGE_TARGET_KEYS, TEXT_TARGET_KEYS, pyramid_grids

VIEWS_VERSION = "views-v1"  # bump when cmapkd.distill.views changes what a view is


def cache_identity(teacher_identity: dict, data_root: Path, split: str, student_image_size: int,
                   num_views: int, seed: int) -> dict:
    """Everything a cached target depends on: the teacher (architecture, weights digest, taps,
    preprocessing, tokenizer), the data (digest of the processed files, split), the grids the maps
    were resampled to, and the views."""
    return {
        "teacher": teacher_identity,
        "data": {"digest": read_info(data_root)["digest"], "split": split},
        "student_grids": [list(g) for g in pyramid_grids(student_image_size)],
        "views": {"num_views": num_views, "seed": seed, "version": VIEWS_VERSION},
    }


class TokenizedCaptions:
    """All captions of a split, flattened in manifest order and tokenized once."""

    def __init__(self, dataset: ImageTextDataset, tokenize):
        self.offsets = np.cumsum([0] + [len(c) for c in dataset.captions])
        flat = dataset.flat_captions()
        ids, masks = [], []
        for start in range(0, len(flat), 1024):
            i, m = tokenize(flat[start : start + 1024])
            ids.append(i)
            masks.append(m)
        self.ids, self.mask = torch.cat(ids), torch.cat(masks)

    def flat_index(self, row: int, caption: int) -> int:
        return int(self.offsets[row] + caption)


class DistillBatches:
    """`make_batch(rows, epoch)` for the trainer. Teacher targets come from `cache` (a
    CacheReader) when given, otherwise `teacher_tokenize` supplies the online teacher's tokens."""

    def __init__(self, dataset: ImageTextDataset, student_tokenize, seed: int, num_views: int = 1,
                 cache: CacheReader | None = None, teacher_tokenize=None, needs_targets: bool = True):
        self.dataset, self.seed, self.num_views, self.cache = dataset, seed, num_views, cache
        self.needs_targets = needs_targets
        self.student_text = TokenizedCaptions(dataset, student_tokenize)
        self.teacher_text = TokenizedCaptions(dataset, teacher_tokenize) if teacher_tokenize and cache is None else None
        self.images = dataset.images

    def __len__(self) -> int:
        return len(self.dataset)

    def choice(self, row: int, epoch: int) -> tuple[int, int]:
        """(caption index, view index) of `row` in `epoch`."""
        rng = np.random.default_rng([self.seed, epoch, row])
        n_caps = len(self.dataset.captions[row])
        return int(rng.integers(n_caps)), int(rng.integers(self.num_views))

    def __call__(self, rows: list[int], epoch: int) -> dict:
        rows = [int(r) for r in rows]
        picks = [self.choice(r, epoch) for r in rows]
        raw = torch.from_numpy(np.ascontiguousarray(self.images[np.asarray(rows)])).permute(0, 3, 1, 2)
        images = torch.empty(raw.shape, dtype=torch.float32)
        for k in sorted({v for _, v in picks}):
            sel = [i for i, (_, v) in enumerate(picks) if v == k]
            images[sel] = make_views(raw[sel], [rows[i] for i in sel], k, self.seed)
        flat = torch.tensor([self.student_text.flat_index(r, c) for r, (c, _) in zip(rows, picks)])
        batch = {"images": images, "text_ids": self.student_text.ids[flat], "text_mask": self.student_text.mask[flat]}
        if not self.needs_targets:
            return batch
        if self.cache is not None:
            parts = {key: [] for key in IMAGE_TARGET_KEYS}
            order = []
            for k in sorted({v for _, v in picks}):
                sel = [i for i, (_, v) in enumerate(picks) if v == k]
                got = self.cache.rows(f"image-v{k}", [rows[i] for i in sel])
                for key in IMAGE_TARGET_KEYS:
                    parts[key].append(got[key])
                order.extend(sel)
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            for key in IMAGE_TARGET_KEYS:
                batch[key] = torch.cat(parts[key])[inverse]
            batch.update(self.cache.rows("text", flat))
        elif self.teacher_text is not None:
            tflat = torch.tensor([self.teacher_text.flat_index(r, c) for r, (c, _) in zip(rows, picks)])
            batch["teacher_text_ids"] = self.teacher_text.ids[tflat]
            batch["teacher_text_mask"] = self.teacher_text.mask[tflat]
        return batch


__all__ = ["DistillBatches", "TokenizedCaptions", "cache_identity", "VIEWS_VERSION", "TEXT_TARGET_KEYS"]
