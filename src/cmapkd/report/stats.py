"""Paired comparison of two models' test retrieval: the difference in mean recall with a 95 %
bootstrap confidence interval.

Input: the per-query ranks the evaluate stage writes (`reports/ranks/<model>.npz`: `i2t_rank`
[n_images], `t2i_rank` [n_captions], `text_to_image` [n_captions]; a hit at k when rank < k).
Mean recall = the mean of the six recalls R@{1,5,10} in both directions, as `retrieval_mean`.

Seeds are pooled: a method's hit indicators are averaged over its seeds query by query, so the
interval covers the test-set sampling of a method run with those seeds (not the spread a new seed
would add; Table 2's +- column shows that). The bootstrap resamples test IMAGES with replacement,
each with all its captions (a cluster bootstrap: an image's i2t query and its captions' t2i queries
share the image), and both models are scored on the same resample (paired), so what they share
cancels. Percentile interval over `n_boot` resamples from a fixed seed: deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cmapkd.report.npz import read_npz

KS = (1, 5, 10)
RANK_KEYS = ("i2t_rank", "t2i_rank", "text_to_image")


class RanksError(ValueError):
    """A ranks file is missing, unreadable or does not fit the others (the message names it)."""


@dataclass(frozen=True)
class Ranks:
    i2t: np.ndarray  # [n_images] int
    t2i: np.ndarray  # [n_captions] int
    text_to_image: np.ndarray  # [n_captions] int


@dataclass(frozen=True)
class Delta:
    """Mean recall of A minus mean recall of B (fractions), with its 95 % interval."""

    diff: float
    lo: float
    hi: float
    n_boot: int

    @property
    def significant(self) -> bool:
        return self.lo > 0 or self.hi < 0


def read_ranks(path: str | Path) -> Ranks:
    path = Path(path)
    got = read_npz(path, RANK_KEYS, RanksError, "per-query ranks (the evaluate stage writes them with --ranks)")
    if got["t2i_rank"].shape != got["text_to_image"].shape:
        raise RanksError(f"{path}: t2i_rank has {got['t2i_rank'].shape} entries, text_to_image {got['text_to_image'].shape}")
    return Ranks(got["i2t_rank"].astype(np.int64), got["t2i_rank"].astype(np.int64), got["text_to_image"].astype(np.int64))


def _hits(ranks: Sequence[Ranks]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seed-averaged hit indicators: i2t [n_images, 3], t2i [n_captions, 3], and text_to_image."""
    ref = ranks[0]
    for r in ranks[1:]:
        if r.i2t.shape != ref.i2t.shape or not np.array_equal(r.text_to_image, ref.text_to_image):
            raise RanksError("the ranks files are not of the same test split (query counts or caption->image map differ)")
    i2t = np.mean([np.stack([r.i2t < k for k in KS], axis=1) for r in ranks], axis=0)
    t2i = np.mean([np.stack([r.t2i < k for k in KS], axis=1) for r in ranks], axis=0)
    return i2t, t2i, ref.text_to_image


def _subset(images: np.ndarray | None, n: int) -> np.ndarray:
    """A boolean mask over the n test images (all of them when `images` is None)."""
    if images is None:
        return np.ones(n, dtype=bool)
    mask = np.asarray(images, dtype=bool)
    if mask.shape != (n,):
        raise RanksError(f"image subset has {mask.shape} entries, the ranks have {n} test images")
    if not mask.any():
        raise RanksError("image subset is empty")
    return mask


def mean_recall(ranks: Sequence[Ranks], images: np.ndarray | None = None) -> float:
    """retrieval_mean of the seed-pooled hits (equals the mean over seeds of each seed's retrieval_mean).
    `images`: a boolean mask of test images; only their image->text queries and their captions'
    text->image queries count (every image stays in the gallery)."""
    i2t, t2i, t2i_map = _hits(ranks)
    mask = _subset(images, i2t.shape[0])
    return float((i2t[mask].mean(0).sum() + t2i[mask[t2i_map]].mean(0).sum()) / (2 * len(KS)))


def paired_delta(a: Sequence[Ranks], b: Sequence[Ranks], n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95, images: np.ndarray | None = None) -> Delta:
    """mean recall(a) - mean recall(b), seeds pooled, with a paired cluster-bootstrap interval;
    `images`: only the queries of these test images (as in `mean_recall`), resampled among them."""
    ia, ta, t2i_map = _hits(a)
    ib, tb, map_b = _hits(b)
    if ia.shape != ib.shape or not np.array_equal(t2i_map, map_b):
        raise RanksError("the two models' ranks are not of the same test split")
    mask = _subset(images, ia.shape[0])
    d_img = (ia - ib).sum(1)  # per image: sum over k of the i2t hit difference
    cap_sum = np.zeros(ia.shape[0])
    np.add.at(cap_sum, t2i_map, (ta - tb).sum(1))  # per image: its captions' t2i differences, summed
    n_caps = np.bincount(t2i_map, minlength=ia.shape[0]).astype(float)
    d_img, cap_sum, n_caps = d_img[mask], cap_sum[mask], n_caps[mask]
    n = d_img.shape[0]
    diff = (d_img.mean() + cap_sum.sum() / n_caps.sum()) / (2 * len(KS))
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)  # [n_boot, n] image counts
    boot = ((w @ d_img) / n + (w @ cap_sum) / (w @ n_caps)) / (2 * len(KS))
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return Delta(float(diff), float(lo), float(hi), n_boot)


__all__ = ["Delta", "KS", "RANK_KEYS", "Ranks", "RanksError", "mean_recall", "paired_delta", "read_ranks"]
