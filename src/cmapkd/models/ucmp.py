"""Unified Cross-Modal Pyramid (METHOD.md section 2): visual pyramid P2..P5, language hierarchy
L1..L4, the V2L/L2V bridge, and the frozen, parameter-free teacher side.

Teacher side (METHOD.md 2.4): `compute_teacher_targets` turns a frozen teacher's tower outputs
into a flat dict of fixed targets, batch-first with a fixed per-sample shape, so the
`cache_teacher` stage can store it row by row (fp16) and the distiller can take it from a cache
batch or compute it online with the same function. Keys (E_t = teacher embedding width,
C_t,i = teacher channels of level i, D_t = teacher text width, g_i = student level grid):

image side (one row per image view)             text side (one row per caption)
  t_vis_l1..t_vis_l4  [C_t,i, h_i, w_i]          t_txt_l1..t_txt_l4  [D_t]     L1..L4 level vectors
  t_vis_pool          [4, E_t]                   t_txt_pool          [4, E_t]  levels in embedding space
  t_img_emb           [E_t] (L2-normalised)      t_txt_emb           [E_t]     final embeddings

`t_vis_l{i}` is the teacher's level-i map resampled (parameter-free) to the student's level grid
g_i when that is not finer than the teacher's own grid, otherwise kept at the teacher's grid
(h_i = min(native, g_i)); the loss upsamples it bilinearly to g_i, which gives the same values as
resampling first but keeps a ViT-L/14 cache 12x smaller at P2. Teacher level maps: ViT taps
(the patch grid of each tap) or the native stride-4..32 CNN stages. Teacher language levels: L1
masked mean of tap 1; L2 window-3 masked average pooling of tap 2, then masked mean; L3
parameter-free self-attention pooling of tap 3 (q = k = LayerNorm(x) without affine, v = x, padded
keys masked), then masked mean; L4 the tower's own sentence state (EOT / mean pooling / [CLS]).
`*_pool`: the tower's `level_embed` on each pooled level (open_clip: its own ln_post/ln_final +
projection; the embedded teacher: per-level heads trained by the teacher stage and frozen).

Student side (all learnable adapters live here, mapping student -> teacher space): the FPN
(lateral 1x1 conv to C, resample to the level grid, add the upsampled coarser level, 3x3 smooth
conv), the same language hierarchy on the student's text taps, 1x1 conv / linear adapters to the
teacher's level widths (intra-modal MSE), the V2L/L2V bridge, and linear projections of the pooled
levels into the teacher's embedding space (cross-modal pyramid KL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmapkd.models.towers import TowerOutput, masked_mean

STRIDES = (4, 8, 16, 32)
IMAGE_TARGET_KEYS = ("t_vis_l1", "t_vis_l2", "t_vis_l3", "t_vis_l4", "t_vis_pool", "t_img_emb")
TEXT_TARGET_KEYS = ("t_txt_l1", "t_txt_l2", "t_txt_l3", "t_txt_l4", "t_txt_pool", "t_txt_emb")
TARGET_KEYS = IMAGE_TARGET_KEYS + TEXT_TARGET_KEYS


def pyramid_grids(image_size: int) -> list[tuple[int, int]]:
    """P2..P5 grids at strides 4/8/16/32 of the input (224 -> 56/28/14/7, 64 -> 16/8/4/2)."""
    return [(math.ceil(image_size / s), math.ceil(image_size / s)) for s in STRIDES]


def resample(x: Tensor, size: Sequence[int]) -> Tensor:
    """Parameter-free resampling of `[B, C, H, W]` to `size`: identity, area (adaptive average
    pooling) when shrinking, bilinear when enlarging."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------
# Language hierarchy (parameter-free; used on both sides)
# --------------------------------------------------------------------------------------------


def window_pool(x: Tensor, mask: Tensor, window: int = 3) -> Tensor:
    """Average of each token's valid neighbours in a window (padding never enters). [B, T, D]."""
    m = mask.to(x.dtype).unsqueeze(1)  # [B, 1, T]
    xt = x.transpose(1, 2) * m  # [B, D, T]
    pad = window // 2
    num = F.avg_pool1d(xt, window, stride=1, padding=pad, count_include_pad=True)
    den = F.avg_pool1d(m, window, stride=1, padding=pad, count_include_pad=True)
    return (num / den.clamp_min(1e-6)).transpose(1, 2)


def self_attention_pool(x: Tensor, mask: Tensor) -> Tensor:
    """Parameter-free self-attention over the valid tokens: q = k = LayerNorm(x) (no affine),
    v = x, padded keys masked. Returns [B, T, D] (padded queries are garbage; mask them later)."""
    d = x.shape[-1]
    q = F.layer_norm(x, (d,))
    scores = q @ q.transpose(1, 2) / math.sqrt(d)
    scores = scores.masked_fill(~mask.bool().unsqueeze(1), float("-inf"))
    return scores.softmax(-1) @ x


def language_levels(out: TowerOutput) -> list[Tensor]:
    """L1..L4 (METHOD.md 2.2) from a text tower's output: four `[B, D_i]` vectors."""
    if out.mask is None or out.pooled is None:
        raise ValueError("language levels need a text TowerOutput with mask and pooled")
    mask = out.mask.bool()
    l1 = masked_mean(out.levels[0], mask)
    l2 = masked_mean(window_pool(out.levels[1], mask, 3), mask)
    l3 = masked_mean(self_attention_pool(out.levels[2], mask), mask)
    return [l1, l2, l3, out.pooled]


# --------------------------------------------------------------------------------------------
# Teacher side: frozen and parameter-free
# --------------------------------------------------------------------------------------------


def target_grids(native: Sequence[Sequence[int]], student: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Stored grid of each teacher level: min(teacher native grid, student level grid) per side."""
    return [(min(n[0], s[0]), min(n[1], s[1])) for n, s in zip(native, student)]


@torch.no_grad()
def teacher_image_targets(teacher, out: TowerOutput, student_grids: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    grids = target_grids([lv.shape[-2:] for lv in out.levels], student_grids)
    t: dict[str, Tensor] = {}
    pools = []
    for i, (lv, g) in enumerate(zip(out.levels, grids)):
        t[f"t_vis_l{i + 1}"] = resample(lv, g)
        pools.append(teacher.image.level_embed(i, lv.mean(dim=(2, 3))))
    t["t_vis_pool"] = torch.stack(pools, dim=1)
    t["t_img_emb"] = F.normalize(out.embedding, dim=-1)
    return t


@torch.no_grad()
def teacher_text_targets(teacher, out: TowerOutput) -> dict[str, Tensor]:
    levels = language_levels(out)
    t = {f"t_txt_l{j + 1}": v for j, v in enumerate(levels)}
    t["t_txt_pool"] = torch.stack([teacher.text.level_embed(j, v) for j, v in enumerate(levels)], dim=1)
    t["t_txt_emb"] = F.normalize(out.embedding, dim=-1)
    return t


@torch.no_grad()
def compute_teacher_targets(
    teacher,
    images: Tensor | None = None,
    text_ids: Tensor | None = None,
    text_mask: Tensor | None = None,
    student_grids: Sequence[Sequence[int]] = (),
) -> dict[str, Tensor]:
    """Run the frozen teacher and return its targets (module docstring). `images`: [0, 1] or uint8
    pixels `[B, 3, H, W]` (the teacher resizes/normalises them); text: the teacher tokenizer's ids
    and mask. Either side may be omitted (the cache stores images and captions separately)."""
    t: dict[str, Tensor] = {}
    if images is not None:
        if not student_grids:
            raise ValueError("compute_teacher_targets: student_grids are needed for the image side")
        t.update(teacher_image_targets(teacher, teacher.image(teacher.image.prepare(images)), student_grids))
    if text_ids is not None:
        t.update(teacher_text_targets(teacher, teacher.text(text_ids, text_mask)))
    return t


@dataclass(frozen=True)
class TeacherDims:
    """What the student-side adapters must map into."""

    vis_channels: tuple[int, int, int, int]
    txt_dims: tuple[int, int, int, int]
    embed_dim: int

    @classmethod
    def from_encoder(cls, teacher) -> "TeacherDims":
        return cls(tuple(teacher.image.level_channels), tuple(teacher.text.level_dims), int(teacher.image.embed_dim))

    @classmethod
    def from_targets(cls, targets: dict[str, Tensor]) -> "TeacherDims":
        """From one batch of cached targets."""
        return cls(
            tuple(int(targets[f"t_vis_l{i}"].shape[1]) for i in range(1, 5)),
            tuple(int(targets[f"t_txt_l{j}"].shape[1]) for j in range(1, 5)),
            int(targets["t_vis_pool"].shape[-1]),
        )


# --------------------------------------------------------------------------------------------
# Student side: every learnable adapter
# --------------------------------------------------------------------------------------------


class VisualPyramid(nn.Module):
    """FPN top-down over four taps: lateral 1x1 conv to C, resample to the level grid, add the
    upsampled coarser level, 3x3 smooth conv (torchvision FPN order: the un-smoothed sum feeds the
    next finer level). ViT taps share one grid; CNN stages already sit on their level grids."""

    def __init__(self, in_channels: Sequence[int], channels: int, grids: Sequence[Sequence[int]]):
        super().__init__()
        self.grids = [tuple(int(v) for v in g) for g in grids]
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        # channels-last convolutions skip oneDNN's NCHW reorders on CPU (docs/benchmarks.md)
        self.to(memory_format=torch.channels_last)

    def _lateral(self, i: int, x: Tensor) -> Tensor:
        g = self.grids[i]
        if x.shape[-2] >= g[0] and x.shape[-1] >= g[1]:
            return self.lateral[i](resample(x, g))  # pool first: cheaper, and the two commute
        return resample(self.lateral[i](x), g)

    def forward(self, taps: Sequence[Tensor]) -> list[Tensor]:
        taps = [t.contiguous(memory_format=torch.channels_last) for t in taps]
        out: list[Tensor] = [None] * 4  # type: ignore[list-item]
        inner = self._lateral(3, taps[3])
        out[3] = self.smooth[3](inner)
        for i in (2, 1, 0):
            inner = self._lateral(i, taps[i]) + F.interpolate(inner, size=self.grids[i], mode="nearest")
            out[i] = self.smooth[i](inner)
        return out


class StudentUCMP(nn.Module):
    """The student-side UCMP and adapters. `forward` returns the student's pyramid, language
    levels, bridge outputs, adapted levels (teacher widths) and level embeddings (teacher space)."""

    def __init__(self, image_channels: Sequence[int], text_dims: Sequence[int], grids: Sequence[Sequence[int]],
                 channels: int, teacher: TeacherDims):
        super().__init__()
        if len(set(text_dims)) != 1:
            raise ValueError(f"student text taps must share one width, got {list(text_dims)}")
        d = int(text_dims[0])
        self.channels, self.text_dim, self.grids = channels, d, [tuple(g) for g in grids]
        self.fpn = VisualPyramid(image_channels, channels, grids)
        self.vis_adapters = nn.ModuleList(nn.Conv2d(channels, c, 1) for c in teacher.vis_channels)
        self.vis_adapters.to(memory_format=torch.channels_last)  # they read the FPN's channels-last maps
        self.txt_adapters = nn.ModuleList(nn.Linear(d, c) for c in teacher.txt_dims)
        self.f_v2l = nn.Linear(channels, d)
        self.f_l2v = nn.Linear(d, channels)
        self.vis_proj = nn.ModuleList(nn.Linear(channels, teacher.embed_dim) for _ in range(4))
        self.txt_proj = nn.ModuleList(nn.Linear(d, teacher.embed_dim) for _ in range(4))

    def forward(self, img: TowerOutput, txt: TowerOutput) -> dict:
        P = self.fpn(img.levels)
        vis_vec = torch.stack([p.mean(dim=(2, 3)) for p in P], dim=1)  # [B, 4, C]  GAP(P_i)
        txt_vec = torch.stack(language_levels(txt), dim=1)  # [B, 4, D]  L1..L4
        return {
            "pyramid": P,
            "vis_vec": vis_vec,
            "txt_vec": txt_vec,
            "v2l": self.f_v2l(vis_vec),  # V_aligned [B, 4, D]
            "l2v": self.f_l2v(txt_vec),  # L_aligned [B, 4, C]
            "vis_emb": torch.stack([m(vis_vec[:, i]) for i, m in enumerate(self.vis_proj)], dim=1),
            "txt_emb": torch.stack([m(txt_vec[:, j]) for j, m in enumerate(self.txt_proj)], dim=1),
            "txt_adapted": [m(txt_vec[:, j]) for j, m in enumerate(self.txt_adapters)],
        }


__all__ = [
    "IMAGE_TARGET_KEYS",
    "STRIDES",
    "StudentUCMP",
    "TARGET_KEYS",
    "TEXT_TARGET_KEYS",
    "TeacherDims",
    "VisualPyramid",
    "compute_teacher_targets",
    "language_levels",
    "pyramid_grids",
    "resample",
    "self_attention_pool",
    "target_grids",
    "teacher_image_targets",
    "teacher_text_targets",
    "window_pool",
]
