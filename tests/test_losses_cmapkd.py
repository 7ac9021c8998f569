"""CMAPKD loss terms: behaviour on constructed features, switches, and a stored regression.

Regenerate tests/data/loss_regression.json (only after an intended change of a loss):
    CMAPKD_REGENERATE=1 python -m pytest -q tests/test_losses_cmapkd.py -k regression
or  python tests/test_losses_cmapkd.py
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from cmapkd.config import LossParams
from cmapkd.losses.cmapkd import (
    TERMS,
    CMAPKDLoss,
    LossContext,
    alpha_matrix,
    normalized_sq_distance,
)

REGRESSION = Path(__file__).resolve().parent / "data" / "loss_regression.json"
LAMBDAS = (1.0, 0.5, 0.3, 0.1)
ALL_TERMS = list(TERMS)


def loss_params(**kw) -> LossParams:
    base = dict(terms=ALL_TERMS, vis_levels=[1, 2, 3, 4], txt_levels=[1, 2, 3, 4], level_weights="uniform",
                manual_weights=[0.1, 0.2, 0.3, 0.4])
    base.update(kw)
    return LossParams(**base)


def make_features(seed: int = 0, B: int = 6, C: int = 8, D: int = 6, E: int = 5, Es: int = 4) -> dict:
    """Fixed, seeded features with every key the loss terms read."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w_v = torch.softmax(r(B, 4), -1)
    w_l = torch.softmax(r(B, 4), -1)
    f = {
        "intra_v": r(B, 4).abs(), "intra_l": r(B, 4).abs(), "w_v": w_v, "w_l": w_l,
        "vis_vec": r(B, 4, C), "txt_vec": r(B, 4, D), "v2l": r(B, 4, D), "l2v": r(B, 4, C),
        "vis_emb": r(B, 4, E), "txt_emb": r(B, 4, E),
        "image_features": torch.nn.functional.normalize(r(B, Es), dim=-1),
        "text_features": torch.nn.functional.normalize(r(B, Es), dim=-1),
        "logit_scale": torch.tensor(1 / 0.07),
        "t_vis_pool": r(B, 4, E), "t_txt_pool": r(B, 4, E), "t_vis_gap4": r(B, 7), "t_txt_l4": r(B, 9),
    }
    return f


def ctx_for(cfg: LossParams, alpha=None) -> LossContext:
    return LossContext(
        vis_levels=[v - 1 for v in cfg.vis_levels], txt_levels=[v - 1 for v in cfg.txt_levels],
        alpha=alpha if alpha is not None else alpha_matrix(cfg.alpha_diag, cfg.alpha_offdiag),
        t_kd=cfg.t_kd, infonce_temperature=cfg.infonce_temperature, align_logit_scale=cfg.align_logit_scale,
    )


def test_normalised_distance_is_zero_iff_directions_match():
    torch.manual_seed(0)
    t = torch.randn(3, 5, 4, 4)
    assert torch.allclose(normalized_sq_distance(t, t), torch.zeros(3))
    assert torch.allclose(normalized_sq_distance(2.5 * t, t), torch.zeros(3), atol=1e-6)  # L2-normalised
    d = normalized_sq_distance(t + 0.3 * torch.randn_like(t), t)
    assert (d > 0).all()
    # "sum" = 2 - 2 cos per position, whatever the width; "mean" divides by the width
    s = torch.randn(3, 5, 4, 4)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=1)
    assert torch.allclose(normalized_sq_distance(s, t), (2 - 2 * cos).flatten(1).mean(1), atol=1e-5)
    assert torch.allclose(normalized_sq_distance(s, t, reduction="mean"), normalized_sq_distance(s, t) / 5, atol=1e-6)


def test_relation_terms_zero_when_student_matches_teacher_and_positive_otherwise():
    cfg = loss_params()
    f = make_features(B=6, C=8, D=6, E=8)
    f["t_vis_gap4"] = f["vis_vec"][:, 3].clone() * 3.0  # the cosine Gram ignores the scale
    f["t_txt_l4"] = f["txt_vec"][:, 3].clone()
    f["t_vis_pool"] = f["vis_vec"].clone() + 2.0  # a correlation ignores offsets
    ctx = ctx_for(cfg)
    assert float(TERMS["relation_sample"](f, ctx)) == pytest.approx(0.0, abs=1e-7)
    assert float(TERMS["relation_layer"](f, ctx)) == pytest.approx(0.0, abs=1e-7)
    g = make_features(seed=1, B=6, C=8, D=6, E=8)
    assert float(TERMS["relation_sample"](g, ctx)) > 1e-3
    assert float(TERMS["relation_layer"](g, ctx)) > 1e-3


def test_pyramid_kl_zero_when_student_level_embeddings_equal_teacher_pools():
    cfg = loss_params()
    f = make_features()
    f["vis_emb"], f["txt_emb"] = f["t_vis_pool"].clone(), f["t_txt_pool"].clone()
    ctx = ctx_for(cfg)
    assert float(TERMS["align_pyramid"](f, ctx)) == pytest.approx(0.0, abs=1e-6)
    assert float(TERMS["align_pyramid"](make_features(seed=3), ctx)) > 1e-3


@pytest.mark.parametrize("vis, txt", [([1, 2, 3, 4], [1, 2, 3, 4]), ([3, 4], [4]), ([2], [1, 3])])
def test_pyramid_kl_equals_the_per_pair_sum(vis, txt):
    """The batched term is METHOD.md's (1/16) sum_ij alpha_ij KL(P_T(V_i, L_j) || P_S(V_i, L_j))
    over the active pairs, each KL averaged over the batch's rows, with an asymmetric alpha."""
    from cmapkd.losses.cmapkd import kl_rows

    cfg = loss_params(vis_levels=vis, txt_levels=txt)
    alpha = torch.arange(16, dtype=torch.float32).view(4, 4) / 8 + 0.1
    ctx = ctx_for(cfg, alpha=alpha)
    f = make_features(seed=5)
    n = torch.nn.functional.normalize
    scale = cfg.align_logit_scale / cfg.t_kd
    want = sum(alpha[i - 1, j - 1] * kl_rows(scale * n(f["t_vis_pool"][:, i - 1], dim=-1) @ n(f["t_txt_pool"][:, j - 1], dim=-1).T,
                                             scale * n(f["vis_emb"][:, i - 1], dim=-1) @ n(f["txt_emb"][:, j - 1], dim=-1).T)
               for i in vis for j in txt) / 16
    assert float(TERMS["align_pyramid"](f, ctx)) == pytest.approx(float(want), rel=1e-5)


def test_intra_uses_weights_and_only_active_levels():
    f = make_features()
    cfg = loss_params(vis_levels=[4], txt_levels=[3, 4])
    ctx = ctx_for(cfg)
    a_v, a_l = TERMS["intra_v"](f, ctx), TERMS["intra_l"](f, ctx)
    f2 = dict(f, intra_v=f["intra_v"].clone(), intra_l=f["intra_l"].clone())
    f2["intra_v"][:, :3] += 10.0
    f2["intra_l"][:, :2] += 10.0
    assert torch.equal(TERMS["intra_v"](f2, ctx), a_v) and torch.equal(TERMS["intra_l"](f2, ctx), a_l)
    assert torch.allclose(a_v, (f["w_v"][:, 3] * f["intra_v"][:, 3]).mean() / 4)
    f3 = dict(f, intra_v=torch.zeros(6, 4), intra_l=torch.zeros(6, 4))
    assert float(TERMS["intra_v"](f3, ctx)) == 0.0 and float(TERMS["intra_l"](f3, ctx)) == 0.0


def test_switches_weights_and_total():
    f = make_features()
    cfg = loss_params(terms=["intra_v", "align_pyramid", "task"])
    out = CMAPKDLoss(cfg, LAMBDAS)(f, ctx_for(cfg))
    named = {k: v for k, v in out.items() if not k.startswith("diag/") and k != "total"}
    assert set(named) == {"intra_v", "align_pyramid", "task"}
    assert torch.allclose(out["total"], sum(named.values()))
    assert torch.allclose(out["align_pyramid"], 0.5 * 0.5 * out["diag/raw/align_pyramid"])  # lambda2 * beta
    assert torch.allclose(out["task"], 0.1 * out["diag/raw/task"])
    # lambda2 scales both alignment terms, nothing else
    cfg_all = loss_params()
    a = CMAPKDLoss(cfg_all, LAMBDAS)(f, ctx_for(cfg_all))
    b = CMAPKDLoss(cfg_all, (1.0, 1.0, 0.3, 0.1))(f, ctx_for(cfg_all))
    assert torch.allclose(b["align_single"], 2 * a["align_single"]) and torch.allclose(b["intra_v"], a["intra_v"])
    # the diversity regulariser: only when asked (policy phase); uniform weights give -2 ln 4
    assert "diversity" not in CMAPKDLoss(loss_params(terms=["task"]), LAMBDAS)(f, ctx_for(cfg))
    u = dict(f, w_v=torch.full((6, 4), 0.25), w_l=torch.full((6, 4), 0.25))
    d = CMAPKDLoss(loss_params(terms=["task"]), LAMBDAS)(u, ctx_for(cfg), extra_terms=("diversity",))
    assert float(d["diag/raw/diversity"]) == pytest.approx(-2 * math.log(4), abs=1e-6)
    assert float(d["diversity"]) == pytest.approx(-0.2 * math.log(4), abs=1e-6)


def test_alpha_fixed_and_learned():
    a = alpha_matrix(1.0, 0.5)
    assert torch.equal(a.diagonal(), torch.ones(4)) and a.sum() == 4 + 12 * 0.5
    table = torch.zeros(4, 4, requires_grad=True)
    learned = alpha_matrix(0, 0, table)
    assert torch.allclose(learned, torch.ones(4, 4))
    learned[0, 0].backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


def compute_regression_values() -> dict:
    out = {}
    for name, cfg in {
        "all_levels_uniform": loss_params(),
        "coarse_p5_l4": loss_params(vis_levels=[4], txt_levels=[4]),
        "medium_learned_alpha": loss_params(vis_levels=[3, 4], txt_levels=[3, 4], alpha_learned=True),
    }.items():
        f = make_features(seed=0)
        alpha = None
        if cfg.alpha_learned:
            alpha = alpha_matrix(0, 0, torch.linspace(-1, 1, 16).view(4, 4))
        res = CMAPKDLoss(cfg, LAMBDAS)(f, ctx_for(cfg, alpha), extra_terms=("diversity",))
        out[name] = {k: float(v) for k, v in res.items() if not k.startswith("diag/")}
    return out


def test_loss_values_match_regression_file():
    values = compute_regression_values()
    if os.environ.get("CMAPKD_REGENERATE") == "1":
        write_regression(values)
    stored = json.loads(REGRESSION.read_text())
    assert set(stored["values"]) == set(values)
    for case, terms in values.items():
        assert set(stored["values"][case]) == set(terms), case
        for k, v in terms.items():
            assert v == pytest.approx(stored["values"][case][k], abs=1e-5, rel=1e-5), (case, k)


def write_regression(values: dict) -> None:
    REGRESSION.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "about": "CMAPKD loss terms (weighted, lambdas 1/0.5/0.3/0.1) on fixed seeded features "
        "(tests/test_losses_cmapkd.py::make_features). Regenerate only after an intended change: "
        "CMAPKD_REGENERATE=1 python -m pytest -q tests/test_losses_cmapkd.py -k regression "
        "(or python tests/test_losses_cmapkd.py).",
        "torch": torch.__version__,
        "values": values,
    }
    REGRESSION.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    write_regression(compute_regression_values())
    print(f"wrote {REGRESSION}")
