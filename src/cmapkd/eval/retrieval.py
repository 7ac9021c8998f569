"""Image-text retrieval recall@k, CLIP_benchmark protocol (ANCHORS.md section 4.2).

Every image and every caption is embedded and L2-normalised; the score of (image i, caption j) is
their cosine similarity.
- t2i ("image retrieval" in CLIP_benchmark): one query per caption over all images; a hit at k if
  the caption's image is among the top k.
- i2t ("text retrieval"): one query per image over all captions; a hit at k if ANY of the image's
  captions is among the top k.
Recall@k is the fraction of queries with a hit. This is not the 1-caption diagonal protocol of
CLIP-KD (ANCHORS.md 4.3); numbers from the two protocols must never be mixed.

Ties are broken deterministically: candidates are ranked by a stable sort on descending score,
then ascending candidate index, so among equal scores the candidate with the lower index ranks
first (CLIP_benchmark uses `torch.topk`, whose order among ties is unspecified). Rather than
sorting, the rank of the best-ranked positive is counted directly (candidates ordered before it),
which is exact under that rule. Scores are computed on CPU in float64, in chunks of queries, so
5k images x 25k captions needs a few hundred MB, not the full score matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

DIRECTIONS = ("i2t", "t2i")


def as_unit_embeddings(x, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """`x` as a CPU tensor of `dtype` with L2-normalised rows; `name` is used in error messages."""
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().to("cpu", dtype)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D array [n, dim], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return F.normalize(x, dim=1)


def as_index_tensor(x) -> torch.Tensor:
    """Integer indices (list, array or tensor on any device) as a flat CPU int64 tensor."""
    x = x.detach().cpu() if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
    return x.to(torch.long).reshape(-1)


def best_positive_rank(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's best-ranked positive column, ranking columns by descending
    score then ascending column index. Rows without a positive get the number of columns."""
    n_cols = scores.shape[1]
    col = torch.arange(n_cols)
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    best_col = torch.where(positive & (scores == best), col, n_cols).amin(dim=1, keepdim=True)
    ahead = (scores > best) | ((scores == best) & (col < best_col))
    rank = ahead.sum(dim=1)
    return torch.where(positive.any(dim=1), rank, torch.full_like(rank, n_cols))


def recall_at_k(
    image_emb,
    text_emb,
    text_to_image: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 512,
    dtype: torch.dtype = torch.float64,
) -> dict[str, dict[int, float]]:
    """Recall@k for both directions, `{"i2t": {k: r}, "t2i": {k: r}}` with r in [0, 1].

    image_emb [n_images, d], text_emb [n_texts, d] (tensors or arrays, normalised here);
    `text_to_image[j]` is the image index of caption j. Every image needs at least one caption.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    ranks = query_ranks(image_emb, text_emb, text_to_image, chunk_size, dtype)
    return {d: {k: float((ranks[d] < k).double().mean()) for k in ks} for d in DIRECTIONS}


def query_ranks(image_emb, text_emb, text_to_image: Sequence[int], chunk_size: int = 512,
                dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """0-based rank of the best-ranked positive of every query: `{"i2t": [n_images], "t2i":
    [n_texts]}` (a hit at k when rank < k). Per-query ranks are what paired comparisons of two
    models resample (cmapkd.report.stats)."""
    img = as_unit_embeddings(image_emb, "image_emb", dtype)
    txt = as_unit_embeddings(text_emb, "text_emb", dtype)
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image_emb has dim {img.shape[1]} but text_emb has dim {txt.shape[1]}")
    t2i = as_index_tensor(text_to_image)
    n_img, n_txt = img.shape[0], txt.shape[0]
    if t2i.numel() != n_txt:
        raise ValueError(f"text_to_image has {t2i.numel()} entries but text_emb has {n_txt} rows")
    bad = ((t2i < 0) | (t2i >= n_img)).nonzero()
    if len(bad):
        j = int(bad[0])
        raise ValueError(f"text_to_image[{j}] = {int(t2i[j])} is not an image index in [0, {n_img})")
    n_caps = torch.bincount(t2i, minlength=n_img)
    if (n_caps == 0).any():
        i = int((n_caps == 0).nonzero()[0])
        raise ValueError(f"image {i} has no caption in text_to_image (i2t recall needs one per image)")

    t2i_rank = torch.empty(n_txt, dtype=torch.long)
    for s in range(0, n_txt, chunk_size):
        scores = txt[s : s + chunk_size] @ img.T  # [c, n_img]
        positive = torch.zeros_like(scores, dtype=torch.bool)
        positive[torch.arange(scores.shape[0]), t2i[s : s + chunk_size]] = True
        t2i_rank[s : s + chunk_size] = best_positive_rank(scores, positive)

    i2t_rank = torch.empty(n_img, dtype=torch.long)
    for s in range(0, n_img, chunk_size):
        scores = img[s : s + chunk_size] @ txt.T  # [c, n_txt]
        positive = t2i[None, :] == torch.arange(s, s + scores.shape[0])[:, None]
        i2t_rank[s : s + chunk_size] = best_positive_rank(scores, positive)

    return {"i2t": i2t_rank, "t2i": t2i_rank}


def flatten_retrieval(metrics: dict[str, dict[int, float]], prefix: str = "retrieval") -> dict[str, float]:
    """Flat keys for a metrics JSON: `retrieval_i2t_r1`, ..., `retrieval_t2i_r10`, and
    `retrieval_mean`, the mean of all the recalls (the six of R@1/5/10 in both directions)."""
    flat = {}
    for d in DIRECTIONS:
        for k, v in sorted(metrics[d].items(), key=lambda kv: int(kv[0])):
            flat[f"{prefix}_{d}_r{k}"] = float(v)
    flat[f"{prefix}_mean"] = float(np.mean(list(flat.values())))
    return flat
