"""The CMAPKD distiller (METHOD.md sections 2-5): student + student-side UCMP adapters + ALSN,
optionally the frozen teacher online. Groups: `student`, `adapters` (FPN, intra adapters, bridge,
level projections), `alsn` (the ALSN and, when learned, the alpha table).

Phases (METHOD.md 5): `distill` (stages 1-3: student + adapters train; the ALSN is frozen),
`policy` (stage 4a: only the ALSN trains, student and adapters frozen and in eval mode, the
diversity regulariser on), `joint` (stage 4b: everything trains). Level selection
(`set_levels`) and the level-weight mode (`set_level_weights`: alsn | uniform | manual) serve the
progressive stages and the ablations.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmapkd.distill.base import Distiller
from cmapkd.losses.cmapkd import CMAPKDLoss, LossContext, alpha_matrix, normalized_sq_distance
from cmapkd.models.alsn import ALSN, entropy
from cmapkd.models.encoders import DualEncoder, build_encoder
from cmapkd.models.ucmp import TARGET_KEYS, StudentUCMP, TeacherDims, pyramid_grids, resample

PHASES = ("distill", "policy", "joint")


def _levels(levels: Sequence[int], key: str) -> list[int]:
    lv = sorted(set(int(v) for v in levels))
    if not lv or lv[0] < 1 or lv[-1] > 4 or len(lv) != len(list(levels)):
        raise ValueError(f"{key}: expected distinct levels in 1..4, got {list(levels)}")
    return [v - 1 for v in lv]


class CMAPKDDistiller(Distiller):
    group_names = ("student", "adapters", "alsn")
    required_targets = TARGET_KEYS

    def __init__(self, student: DualEncoder, model_cfg, loss_cfg, lambdas: Sequence[float],
                 teacher: DualEncoder | None = None, teacher_dims: TeacherDims | None = None):
        super().__init__(student, teacher)
        if teacher_dims is None:
            if teacher is None:
                raise ValueError("CMAPKDDistiller needs the teacher or its TeacherDims (from the cache)")
            teacher_dims = TeacherDims.from_encoder(teacher)
        self.teacher_dims = teacher_dims
        self.model_cfg, self.loss_cfg = model_cfg, loss_cfg
        C = int(model_cfg.pyramid_channels)
        self.grids = pyramid_grids(student.image.image_size)
        self.ucmp = StudentUCMP(student.image.level_channels, student.text.level_dims, self.grids, C, teacher_dims)
        self.alsn = ALSN(C, student.text.level_dims[3], model_cfg.alsn_hidden, model_cfg.alsn_dropout, model_cfg.alsn_tau)
        self.alpha_table = nn.Parameter(torch.zeros(4, 4)) if loss_cfg.alpha_learned else None
        self.loss = CMAPKDLoss(loss_cfg, tuple(lambdas))
        self.register_buffer("alpha_fixed", alpha_matrix(loss_cfg.alpha_diag, loss_cfg.alpha_offdiag), persistent=False)
        self.set_levels(loss_cfg.vis_levels, loss_cfg.txt_levels)
        self.set_level_weights(loss_cfg.level_weights, loss_cfg.manual_weights)
        self.phase = "distill"
        self.set_phase("distill")

    @classmethod
    def from_params(cls, params, teacher_online: bool = True, teacher_dims: TeacherDims | None = None) -> "CMAPKDDistiller":
        """Build student (and teacher when online) from `params.model`, the losses from
        `params.loss` and lambda1..4."""
        student = build_encoder(params.model.student)
        teacher = build_encoder(params.model.teacher) if teacher_online else None
        lambdas = (params.lambda1, params.lambda2, params.lambda3, params.lambda4)
        return cls(student, params.model, params.loss, lambdas, teacher=teacher, teacher_dims=teacher_dims)

    # ---- configuration ----------------------------------------------------------------------

    def set_levels(self, vis_levels: Sequence[int], txt_levels: Sequence[int]) -> None:
        """Active levels, 1-indexed: visual 1..4 = P2..P5, language 1..4 = L1..L4."""
        self.vis_levels = _levels(vis_levels, "loss.vis_levels")
        self.txt_levels = _levels(txt_levels, "loss.txt_levels")

    def set_level_weights(self, mode: str, manual: Sequence[float] | None = None) -> None:
        if mode not in ("alsn", "uniform", "manual"):
            raise ValueError(f"loss.level_weights: expected alsn | uniform | manual, got {mode!r}")
        if mode == "manual":
            if manual is None or len(manual) != 4 or any(w < 0 for w in manual) or sum(manual) <= 0:
                raise ValueError(f"loss.manual_weights: expected 4 non-negative weights, got {manual}")
        self.level_weight_mode = mode
        self.manual_weights = list(manual) if manual is not None else [0.25] * 4

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; phases: {PHASES}")
        self.phase = phase
        frozen = {"distill": ["alsn"], "policy": ["student", "adapters"], "joint": []}[phase]
        self.freeze_groups([g for g in self.group_names if g not in frozen], frozen=False)
        self.freeze_groups(frozen, frozen=True)

    def group_modules(self) -> dict[str, list]:
        alsn: list = [self.alsn] + ([self.alpha_table] if self.alpha_table is not None else [])
        return {"student": [self.student], "adapters": [self.ucmp], "alsn": alsn}

    def student_grids(self) -> list[tuple[int, int]]:
        return list(self.grids)

    # ---- level weights ----------------------------------------------------------------------

    def _mask(self, levels: list[int], ref: Tensor) -> Tensor:
        m = torch.zeros(4, device=ref.device, dtype=ref.dtype)
        m[levels] = 1.0
        return m

    def level_weights(self, x_v: Tensor, x_l: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample weights [B, 4] over the active levels (zero elsewhere, rows sum to 1)."""
        B = x_v.shape[0]
        if self.level_weight_mode == "alsn":
            w_v, w_l = self.alsn(x_v.detach(), x_l.detach())
        else:
            base = [1.0] * 4 if self.level_weight_mode == "uniform" else self.manual_weights
            w = torch.tensor(base, device=x_v.device, dtype=x_v.dtype).expand(B, 4)
            w_v, w_l = w, w
        w_v = w_v * self._mask(self.vis_levels, w_v)
        w_l = w_l * self._mask(self.txt_levels, w_l)
        return w_v / w_v.sum(-1, keepdim=True).clamp_min(1e-12), w_l / w_l.sum(-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def alsn_weights(self, images: Tensor, text_ids: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The ALSN's per-sample weights (eval mode, all levels) for the figures."""
        was = self.training
        self.eval()
        s = self._student(images, text_ids, text_mask)
        w = self.alsn(s["vis_vec"][:, 3], s["txt_vec"][:, 3])
        self.train(was)
        return w

    # ---- the two steps ----------------------------------------------------------------------

    def _student(self, images: Tensor, text_ids: Tensor, text_mask: Tensor) -> dict:
        img = self.student.image(self.student.image.prepare(images))
        txt = self.student.text(text_ids, text_mask)
        s = self.ucmp(img, txt)
        s["image_features"] = F.normalize(img.embedding, dim=-1)
        s["text_features"] = F.normalize(txt.embedding, dim=-1)
        return s

    def compute_features(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        t = self.targets_from_batch(batch)
        s = self._student(batch["images"], batch["text_ids"], batch["text_mask"])
        B = s["vis_vec"].shape[0]
        red = self.loss_cfg.intra_reduction
        zeros = s["vis_vec"].new_zeros(B)
        d_v = [zeros] * 4
        for i in self.vis_levels:
            P = s["pyramid"][i]
            target = resample(t[f"t_vis_l{i + 1}"], P.shape[-2:])
            d_v[i] = normalized_sq_distance(self.ucmp.vis_adapters[i](P), target, dim=1, reduction=red)
        d_l = [zeros] * 4
        for j in self.txt_levels:
            d_l[j] = normalized_sq_distance(s["txt_adapted"][j], t[f"t_txt_l{j + 1}"], dim=-1, reduction=red)
        w_v, w_l = self.level_weights(s["vis_vec"][:, 3], s["txt_vec"][:, 3])
        return {
            "intra_v": torch.stack(d_v, 1),
            "intra_l": torch.stack(d_l, 1),
            "w_v": w_v,
            "w_l": w_l,
            **{k: s[k] for k in ("vis_vec", "txt_vec", "v2l", "l2v", "vis_emb", "txt_emb", "image_features", "text_features")},
            "logit_scale": self.student.logit_scale.exp(),
            "t_vis_pool": t["t_vis_pool"],
            "t_txt_pool": t["t_txt_pool"],
            "t_vis_gap4": t["t_vis_l4"].mean(dim=(2, 3)),
            "t_txt_l4": t["t_txt_l4"],
        }

    def alpha(self) -> Tensor:
        if self.alpha_table is not None:
            return alpha_matrix(0.0, 0.0, self.alpha_table)
        return self.alpha_fixed

    def compute_losses(self, f: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.loss_cfg
        ctx = LossContext(
            vis_levels=self.vis_levels, txt_levels=self.txt_levels, alpha=self.alpha(), t_kd=cfg.t_kd,
            infonce_temperature=cfg.infonce_temperature, align_logit_scale=cfg.align_logit_scale,
        )
        extra = ("diversity",) if self.phase == "policy" and self.level_weight_mode == "alsn" else ()
        out = self.loss(dict(f), ctx, extra)
        w_v, w_l = f["w_v"].detach(), f["w_l"].detach()
        for name, w in (("v", w_v), ("l", w_l)):
            for i in range(4):
                out[f"diag/w_{name}{i + 1}"] = w[:, i].mean()
            out[f"diag/w_{name}_std"] = w.std(0, unbiased=False).mean()  # do the weights vary across samples?
            out[f"diag/H_{name}"] = entropy(w)
        out["diag/logit_scale"] = f["logit_scale"].detach()
        return out


def replace_loss(cfg, **changes):
    """A copy of a LossParams with some fields changed (stages and ablations)."""
    return dataclasses.replace(cfg, **changes)


__all__ = ["CMAPKDDistiller", "PHASES", "replace_loss"]
