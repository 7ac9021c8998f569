"""Deterministic training views (METHOD.md section 6: a cached target belongs to one exact view).

View 0 of a sample is the image itself; view k > 0 is a mild crop-and-rescale plus brightness and
contrast jitter whose parameters are a pure function of (seed, row, k). There is no horizontal
flip: EmojiScenes captions name positions ("at the top left"), and a flip would make them false.
The crop is at most `max_crop` of each side, so objects stay in their grid cell.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def view_params(seed: int, row: int, k: int, max_crop: float = 0.08, jitter: float = 0.1) -> tuple:
    """(top, left, height, width) as fractions, and (brightness, contrast) factors."""
    if k == 0:
        return (0.0, 0.0, 1.0, 1.0), (1.0, 1.0)
    rng = np.random.default_rng([seed, row, k])
    scale = 1.0 - rng.uniform(0.0, max_crop)
    top, left = rng.uniform(0.0, 1.0 - scale, size=2)
    b, c = 1.0 + rng.uniform(-jitter, jitter, size=2)
    return (float(top), float(left), float(scale), float(scale)), (float(b), float(c))


def make_views(images: torch.Tensor, rows: list[int], k: int, seed: int) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float [B,3,H,W] in [0,1]: view k of each image (rows = dataset rows)."""
    x = images.float() / 255.0
    if k == 0:
        return x
    H, W = x.shape[-2:]
    out = torch.empty_like(x)
    for i, row in enumerate(rows):
        (top, left, h, w), (b, c) = view_params(seed, int(row), k)
        t, l = int(round(top * H)), int(round(left * W))
        hh, ww = max(1, int(round(h * H))), max(1, int(round(w * W)))
        crop = x[i : i + 1, :, t : t + hh, l : l + ww]
        crop = F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False, antialias=True)
        mean = crop.mean(dim=(1, 2, 3), keepdim=True)
        out[i : i + 1] = ((crop - mean) * c + mean) * b
    return out.clamp_(0.0, 1.0)
