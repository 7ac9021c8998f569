"""CMAPKD loss terms (METHOD.md section 4).

Every term is a function with one signature, `term(f, ctx) -> Tensor` (a scalar, unweighted):
`f` is the dict of batch-first student features and teacher targets that the distiller's
`compute_features` returns (gathered across ranks by the training loop when it runs on several),
`ctx` a `LossContext` with the active levels, the alpha matrix and the constants. `CMAPKDLoss`
weights and sums them in one place:

    term             weight          METHOD.md 4
    intra_v          lambda1         (1/4) sum_i mean_b[ w_v[b,i] * d(norm S_v^i, norm T_v^i) ]
    intra_l          lambda1         same for language with w_l
    align_single     lambda2         symmetric InfoNCE (T=0.07) of the global features via the bridge
    align_pyramid    lambda2 * beta  (1/16) sum_ij alpha_ij KL(P_T(V_i,L_j) || P_S(V_i,L_j))
    relation_sample  lambda3         MSE(G_S, G_T), B x B cosine Gram of [GAP(P5); L4]
    relation_layer   lambda3 * gamma MSE(R_S, R_T), per-sample 4x4 correlation of the pooled levels
    task             lambda4         open_clip ClipLoss on the student's final embeddings
    diversity        0.1             -H(w_v) - H(w_l) (ALSN policy phase)

Feature keys read here (B rows; C student pyramid width, D student text width, E_t teacher
embedding width): intra_v, intra_l [B, 4] per-sample level distances (computed per sample in
`compute_features`, so big maps never cross ranks); w_v, w_l [B, 4]; vis_vec [B, 4, C] = GAP(P_i);
txt_vec [B, 4, D] = L_j; v2l [B, 4, D]; l2v [B, 4, C]; vis_emb, txt_emb [B, 4, E_t];
image_features, text_features [B, E_s] (L2-normalised); logit_scale (scalar, exp'd);
t_vis_pool, t_txt_pool [B, 4, E_t]; t_vis_gap4 [B, C_t,4]; t_txt_l4 [B, D_t].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmapkd.models.alsn import entropy

LEVELS = 4


@dataclass
class LossContext:
    vis_levels: list[int]  # active visual levels, 0-based (0 = P2 ... 3 = P5)
    txt_levels: list[int]  # active language levels, 0-based (0 = L1 ... 3 = L4)
    alpha: Tensor  # [4, 4] level compatibilities alpha_ij
    t_kd: float = 4.0
    infonce_temperature: float = 0.07
    align_logit_scale: float = 100.0
    extras: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def normalized_sq_distance(s: Tensor, t: Tensor, dim: int = 1, reduction: str = "sum") -> Tensor:
    """Squared distance between channel-L2-normalised features, per sample: `[B, ...]` -> `[B]`.
    reduction "sum": summed over channels (= 2 - 2 cos, independent of the width), averaged over
    positions; "mean": F.mse_loss's mean over channels and positions."""
    d = (F.normalize(s, dim=dim) - F.normalize(t, dim=dim)).pow(2)
    d = d.sum(dim=dim) if reduction == "sum" else d.mean(dim=dim)
    return d.flatten(1).mean(1) if d.dim() > 1 else d


def symmetric_infonce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """CLIP-style symmetric InfoNCE on cosine similarities, positives on the diagonal."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def kl_rows(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(softmax(p) || softmax(q)) averaged over rows."""
    p_log = p_logits.log_softmax(-1)
    return (p_log.exp() * (p_log - q_logits.log_softmax(-1))).sum(-1).mean()


def cosine_gram(x: Tensor) -> Tensor:
    x = F.normalize(x, dim=-1)
    return x @ x.transpose(-1, -2)


def level_correlation(v: Tensor) -> Tensor:
    """Per-sample Pearson correlation between levels: `[B, K, E]` -> `[B, K, K]`."""
    v = v - v.mean(dim=-1, keepdim=True)
    return cosine_gram(v)


def _zero(f: dict) -> Tensor:
    return f["w_v"].new_zeros(())


# --------------------------------------------------------------------------------------------
# terms: term(f, ctx) -> scalar
# --------------------------------------------------------------------------------------------


def intra_v(f: dict, ctx: LossContext) -> Tensor:
    if not ctx.vis_levels:
        return _zero(f)
    idx = ctx.vis_levels
    return (f["w_v"][:, idx] * f["intra_v"][:, idx]).mean(0).sum() / LEVELS


def intra_l(f: dict, ctx: LossContext) -> Tensor:
    if not ctx.txt_levels:
        return _zero(f)
    idx = ctx.txt_levels
    return (f["w_l"][:, idx] * f["intra_l"][:, idx]).mean(0).sum() / LEVELS


def align_single(f: dict, ctx: LossContext) -> Tensor:
    """Global level (P5, L4) through the bridge, both ways: V2L(GAP P5) vs L4 in the language
    space, GAP(P5) vs L2V(L4) in the visual space; averaged."""
    t = ctx.infonce_temperature
    return 0.5 * (
        symmetric_infonce(f["v2l"][:, 3], f["txt_vec"][:, 3], t) + symmetric_infonce(f["vis_vec"][:, 3], f["l2v"][:, 3], t)
    )


def align_pyramid(f: dict, ctx: LossContext) -> Tensor:
    if not ctx.vis_levels or not ctx.txt_levels:
        return _zero(f)
    scale = ctx.align_logit_scale / ctx.t_kd
    tv, tl = F.normalize(f["t_vis_pool"].float(), dim=-1), F.normalize(f["t_txt_pool"].float(), dim=-1)
    sv, sl = F.normalize(f["vis_emb"], dim=-1), F.normalize(f["txt_emb"], dim=-1)
    vi, tj = list(ctx.vis_levels), list(ctx.txt_levels)
    # every (i, j) pair at once: logits [I, J, B, B], row b = image b against every caption
    p_t = scale * torch.einsum("bie,cje->ijbc", tv[:, vi], tl[:, tj])
    p_s = scale * torch.einsum("bie,cje->ijbc", sv[:, vi], sl[:, tj])
    p_log = p_t.log_softmax(-1)
    kl = (p_log.exp() * (p_log - p_s.log_softmax(-1))).sum(-1).mean(-1)  # [I, J]: kl_rows of each pair
    total = (ctx.alpha[vi][:, tj] * kl).sum()
    # no Hinton T^2 factor (METHOD.md's formula has none): with logits 100*cos/4 the gradient per
    # pair is already 25*(q - p) per unit cosine, about 2x that of InfoNCE at T = 0.07
    return total / (LEVELS * LEVELS)


def relation_sample(f: dict, ctx: LossContext) -> Tensor:
    s = torch.cat([F.normalize(f["vis_vec"][:, 3], dim=-1), F.normalize(f["txt_vec"][:, 3], dim=-1)], -1)
    t = torch.cat([F.normalize(f["t_vis_gap4"].float(), dim=-1), F.normalize(f["t_txt_l4"].float(), dim=-1)], -1)
    return F.mse_loss(cosine_gram(s), cosine_gram(t))


def relation_layer(f: dict, ctx: LossContext) -> Tensor:
    idx = ctx.vis_levels
    if len(idx) < 2:
        return _zero(f)
    r_s = level_correlation(f["vis_vec"][:, idx])
    r_t = level_correlation(f["t_vis_pool"][:, idx].float())
    return F.mse_loss(r_s, r_t)


def task(f: dict, ctx: LossContext) -> Tensor:
    """open_clip ClipLoss on the (already gathered) final embeddings with the student's scale."""
    from open_clip.loss import ClipLoss

    loss = ctx.extras.get("clip_loss")
    if loss is None:
        loss = ctx.extras["clip_loss"] = ClipLoss()
    return loss(f["image_features"], f["text_features"], f["logit_scale"])


def diversity(f: dict, ctx: LossContext) -> Tensor:
    """-H(w_v) - H(w_l): minimising it keeps the per-sample level weights from collapsing."""
    return -(entropy(f["w_v"]) + entropy(f["w_l"]))


TERMS: dict[str, Callable[[dict, LossContext], Tensor]] = {
    "intra_v": intra_v,
    "intra_l": intra_l,
    "align_single": align_single,
    "align_pyramid": align_pyramid,
    "relation_sample": relation_sample,
    "relation_layer": relation_layer,
    "task": task,
    "diversity": diversity,
}


def alpha_matrix(diag: float, offdiag: float, table: Tensor | None = None) -> Tensor:
    """alpha_ij: diag/offdiag constants, or 16 * softmax over a learnable 4x4 table (mean 1, so
    the learned variant starts on the same scale as uniform weights)."""
    if table is not None:
        return table.flatten().softmax(0).view(LEVELS, LEVELS) * (LEVELS * LEVELS)
    eye = torch.eye(LEVELS)
    return eye * diag + (1 - eye) * offdiag


class CMAPKDLoss(nn.Module):
    """The weighted sum, in one place. `forward(f, ctx)` -> {term: weighted value, ..., "total"}
    plus `diag/raw/<term>` (unweighted, detached)."""

    def __init__(self, cfg, lambdas: tuple[float, float, float, float]):
        super().__init__()
        l1, l2, l3, l4 = lambdas
        self.coefficients = {
            "intra_v": l1,
            "intra_l": l1,
            "align_single": l2,
            "align_pyramid": l2 * cfg.beta,
            "relation_sample": l3,
            "relation_layer": l3 * cfg.gamma,
            "task": l4,
            "diversity": cfg.diversity_weight,
        }
        unknown = sorted(set(cfg.terms) - set(TERMS))
        if unknown:
            raise ValueError(f"loss.terms: unknown term(s) {unknown}; known: {list(TERMS)}")
        self.terms = [t for t in TERMS if t in cfg.terms]

    def forward(self, f: dict, ctx: LossContext, extra_terms: tuple[str, ...] = ()) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        active = [t for t in TERMS if t in self.terms or t in extra_terms]
        for name in active:
            raw = TERMS[name](f, ctx)
            out[name] = self.coefficients[name] * raw
            out[f"diag/raw/{name}"] = raw.detach()
        total = sum((v for k, v in out.items() if not k.startswith("diag/")), start=f["w_v"].new_zeros(()))
        out["total"] = total
        return out


__all__ = [
    "CMAPKDLoss",
    "LossContext",
    "TERMS",
    "alpha_matrix",
    "cosine_gram",
    "kl_rows",
    "level_correlation",
    "normalized_sq_distance",
    "symmetric_infonce",
]
