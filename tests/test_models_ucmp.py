"""UCMP and ALSN behaviour: pyramid grids, padding-free language levels, teacher targets, ALSN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cmapkd.config import load_params
from cmapkd.models.alsn import ALSN, entropy
from cmapkd.models.encoders import build_encoder
from cmapkd.models.towers import TimmImageTower, TowerOutput, masked_mean
from cmapkd.models.ucmp import (
    IMAGE_TARGET_KEYS,
    TEXT_TARGET_KEYS,
    VisualPyramid,
    compute_teacher_targets,
    language_levels,
    pyramid_grids,
    target_grids,
)

ROOT = Path(__file__).resolve().parents[1]




def test_grid_rule_follows_strides():
    assert pyramid_grids(224) == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert pyramid_grids(64) == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert pyramid_grids(128) == [(32, 32), (16, 16), (8, 8), (4, 4)]


@pytest.mark.parametrize("vit_grid", [14, 16], ids=["B16-14x14", "L14-16x16"])
def test_fpn_from_a_single_vit_grid(vit_grid):
    torch.manual_seed(0)
    taps = [torch.randn(2, 32, vit_grid, vit_grid) for _ in range(4)]
    fpn = VisualPyramid([32] * 4, 16, pyramid_grids(224))
    P = fpn(taps)
    assert [tuple(p.shape) for p in P] == [(2, 16, 56, 56), (2, 16, 28, 28), (2, 16, 14, 14), (2, 16, 7, 7)]
    # top-down: the coarsest tap reaches every level, the finest only P2
    P_a = fpn([taps[0], taps[1], taps[2], taps[3] + 1.0])
    assert all(not torch.allclose(a, b) for a, b in zip(P, P_a))
    P_b = fpn([taps[0] + 1.0, taps[1], taps[2], taps[3]])
    assert not torch.allclose(P[0], P_b[0]) and all(torch.equal(a, b) for a, b in zip(P[1:], P_b[1:]))
    # teacher side: parameter-free, stored at min(native, student grid)
    assert target_grids([(vit_grid, vit_grid)] * 4, pyramid_grids(224)) == [(vit_grid,) * 2, (vit_grid,) * 2, (14, 14), (7, 7)]


def test_fpn_on_cnn_native_stages():
    torch.manual_seed(0)
    tower = TimmImageTower("tf_efficientnet_lite0", "", [1, 2, 3, 4], 64, 32).eval()
    with torch.no_grad():
        out = tower(tower.prepare(torch.rand(2, 3, 64, 64)))
    native = [tuple(l.shape[-2:]) for l in out.levels]
    assert native == pyramid_grids(64)  # C2..C5 already sit on the level grids
    fpn = VisualPyramid(tower.level_channels, 16, pyramid_grids(64))
    assert [tuple(p.shape[-2:]) for p in fpn(out.levels)] == native
    # the embedded teacher (128 px CNN) against the 64 px student: pooled 2x to the student grid
    assert target_grids([(32, 32), (16, 16), (8, 8), (4, 4)], pyramid_grids(64)) == pyramid_grids(64)


def test_language_levels_ignore_padding_and_use_the_mask():
    torch.manual_seed(0)
    B, T, D = 3, 10, 8
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate((4, 7, 10)):
        mask[b, :n] = True
    levels = [torch.randn(B, T, D) for _ in range(4)]
    base = language_levels(TowerOutput(levels, torch.zeros(B, 2), mask, pooled=levels[3][:, 0]))
    noisy = [torch.where(mask.unsqueeze(-1), l, torch.randn_like(l) * 100) for l in levels]
    again = language_levels(TowerOutput(noisy, torch.zeros(B, 2), mask, pooled=levels[3][:, 0]))
    for a, b in zip(base[:3], again[:3]):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(base[0], masked_mean(levels[0], mask))
    assert not torch.allclose(base[0][:2], levels[0][:2].mean(1))  # a plain mean would see the padding


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_padding_tokens_do_not_change_l1_to_l3(which, teacher, student):
    enc = teacher if which == "teacher" else student
    ids, mask = enc.tokenize(["a red apple next to a dog", "three balloons over a small house at night"])
    g = torch.Generator().manual_seed(1)
    garbage = torch.randint(1000, 2000, ids.shape, generator=g)
    ids2 = torch.where(mask, ids, garbage)
    with torch.no_grad():
        a = language_levels(enc.text(ids, mask))
        b = language_levels(enc.text(ids2, mask))
    for la, lb in zip(a[:3], b[:3]):
        assert torch.allclose(la, lb, atol=1e-5)
    assert torch.allclose(a[3], b[3], atol=1e-5)


def test_teacher_targets_keys_shapes_and_no_parameters_in_the_way(teacher, student):
    ids, mask = teacher.tokenize(["a red apple", "a dog in the snow"])
    images = torch.rand(2, 3, 128, 128)
    grids = pyramid_grids(student.image.image_size)
    t = compute_teacher_targets(teacher, images, ids, mask, grids)
    assert set(t) == set(IMAGE_TARGET_KEYS) | set(TEXT_TARGET_KEYS)
    assert [tuple(t[f"t_vis_l{i}"].shape) for i in range(1, 5)] == [(2, 24, 16, 16), (2, 48, 8, 8), (2, 120, 4, 4), (2, 352, 2, 2)]
    assert t["t_vis_pool"].shape == (2, 4, 256) and t["t_img_emb"].shape == (2, 256)
    assert [tuple(t[f"t_txt_l{j}"].shape) for j in range(1, 5)] == [(2, 384)] * 4
    assert t["t_txt_pool"].shape == (2, 4, 256) and t["t_txt_emb"].shape == (2, 256)
    assert torch.allclose(t["t_img_emb"].norm(dim=-1), torch.ones(2))
    assert all(not v.requires_grad for v in t.values())
    # image side and text side can be computed separately (row by row for the cache)
    img_only = compute_teacher_targets(teacher, images=images[:1], student_grids=grids)
    assert set(img_only) == set(IMAGE_TARGET_KEYS)
    assert torch.allclose(img_only["t_vis_l2"], t["t_vis_l2"][:1], atol=1e-5)
    txt_only = compute_teacher_targets(teacher, text_ids=ids[1:], text_mask=mask[1:])
    assert set(txt_only) == set(TEXT_TARGET_KEYS)
    assert torch.allclose(txt_only["t_txt_l3"], t["t_txt_l3"][1:], atol=1e-5)


def test_alsn_weights_are_per_sample_distributions_that_sharpen_as_tau_falls():
    torch.manual_seed(0)
    alsn = ALSN(16, 8, (32, 16), dropout=0.1, tau=1.0).eval()
    # a visible spread of sigmoid outputs
    with torch.no_grad():
        alsn.head_v.weight.mul_(20)
        alsn.head_l.weight.mul_(20)
    x_v, x_l = torch.randn(64, 16), torch.randn(64, 8)
    with torch.no_grad():
        w_v, w_l = alsn(x_v, x_l)
    for w in (w_v, w_l):
        assert w.shape == (64, 4) and (w >= 0).all()
        assert torch.allclose(w.sum(-1), torch.ones(64), atol=1e-6)
        assert w.std(0).mean() > 1e-3  # it depends on the sample
    ents = []
    for tau in (4.0, 1.0, 0.5, 0.1, 0.02):
        with torch.no_grad():
            w_v, w_l = alsn(x_v, x_l, tau=tau)
        ents.append((float(entropy(w_v)), float(entropy(w_l))))
        assert torch.allclose(w_v.sum(-1), torch.ones(64), atol=1e-6)
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(ents, ents[1:])), ents
    assert ents[-1][0] < 0.5 * ents[0][0]
