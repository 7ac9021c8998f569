"""Baseline methods as distillers for the shared training loop. Each differs only in its losses.

Every baseline trains the same student with the same task loss (open_clip `ClipLoss` on the
student's final embeddings, weight `baselines.task_weight`) plus its own distillation terms, reads
the frozen teacher's targets from the batch (teacher cache) or computes them online with the same
function (`Distiller.targets_from_batch`), and logs every weighted term under its own key
(`compute_losses`: terms + `total` + `diag/*`). Params: the `baselines:` section of params.yaml
(`cmapkd.config.BaselinesParams`); docs/baselines.md describes each method and its adaptation.

| name | class | groups | distillation terms |
|---|---|---|---|
| scratch | `ScratchStudent` | student | none (no teacher) |
| kd | `KDDistiller` | student | `kd` |
| fitnet | `FitNetDistiller` | student, adapters | `fitnet_v`, `fitnet_l` |
| clipkd | `CLIPKDDistiller` | student, adapters | `crd`, `icl`, `fd` |
| promptkd | `PromptKDAdapted` | student, adapters | `promptkd_img` (+ `promptkd_txt`) |
| c2kd | `C2KDAdapted` | student, adapters | `c2kd_ntkd`, `c2kd_proxy` |
| llavakd | `LLaVAKDAdapted` | student | `mdist_res`, `mdist_vis`, `rdist` |

Teacher logit scale: the cache holds the teacher's L2-normalised final embeddings (`t_img_emb`,
`t_txt_emb`) but not its logit scale, so every teacher similarity distribution uses the fixed
`baselines.teacher_logit_scale` (100 = OpenAI CLIP's learned scale, which open_clip clamps at;
MobileCLIP distils with `--distill-logit-scale 100`). Cached and online runs therefore compute the
same losses. Student distributions use the student's own learned scale (clamped at 100).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor, nn

from cmapkd.distill.base import Distiller
from cmapkd.losses.cmapkd import cosine_gram, normalized_sq_distance
from cmapkd.models.encoders import DualEncoder
from cmapkd.models.towers import TowerOutput
from cmapkd.models.ucmp import TeacherDims, language_levels, pyramid_grids, resample

LOGIT_SCALE_MAX = 4.6052  # ln(100), open_clip's clamp
EMB_TARGETS = ("t_img_emb", "t_txt_emb")


# --------------------------------------------------------------------------------------------
# Loss functions (pure; tested on hand-computed cases)
# --------------------------------------------------------------------------------------------


def kl_per_row(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Hinton KD per row: T^2 * KL(softmax(teacher / T) || softmax(student / T)), `[R, N]` -> `[R]`.
    The gradient equals that of the cross-entropy form (open_clip `DistillClipLoss`), which differs
    from KL only by the teacher's entropy, a constant; KL is 0 when the distributions agree."""
    T = float(temperature)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    log_p_s = F.log_softmax(student_logits.float() / T, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * (T * T)


def in_batch_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """KD on an in-batch image x text similarity matrix, both directions: (image->text over rows,
    text->image over columns), each averaged over its rows."""
    i2t = kl_per_row(student_logits, teacher_logits, temperature).mean()
    t2i = kl_per_row(student_logits.T, teacher_logits.T, temperature).mean()
    return i2t, t2i


def off_diagonal(x: Tensor) -> Tensor:
    """The off-diagonal entries of a square `[N, N]` matrix, row by row: `[N, N - 1]`."""
    n = x.shape[0]
    return x.flatten()[1:].view(n - 1, n + 1)[:, :-1].reshape(n, n - 1)


def kendall_tau_b(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise Kendall rank correlation tau-b of `x[i]` and `y[i]` (`[R, N]` each) -> `[R]`, the
    variant `scipy.stats.kendalltau` computes by default; a row where x or y is constant gives 0
    (scipy: NaN). Exact O(N^2) per row, in chunks of rows that bound the memory to ~2^24 pairs."""
    x, y = x.detach().float(), y.detach().float()
    R, N = x.shape
    out = x.new_zeros(R)
    step = max(1, (1 << 24) // max(1, N * N))
    for s in range(0, R, step):
        sx = torch.sign(x[s : s + step, :, None] - x[s : s + step, None, :])
        sy = torch.sign(y[s : s + step, :, None] - y[s : s + step, None, :])
        num = (sx * sy).sum((1, 2))
        den = (sx.abs().sum((1, 2)) * sy.abs().sum((1, 2))).sqrt()
        out[s : s + step] = torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))
    return out


def non_target_kd(student_logits: Tensor, teacher_logits: Tensor, keep: Tensor, temperature: float = 1.0) -> Tensor:
    """C2KD's non-target KD: KL over the off-diagonal (non-matching) entries of each row only,
    counted for the rows with `keep` = 1 and averaged over all rows (C2KD `ntkl`)."""
    if student_logits.shape[0] < 2:
        return student_logits.sum() * 0.0
    kl = kl_per_row(off_diagonal(student_logits), off_diagonal(teacher_logits), temperature)
    return (keep.to(kl.dtype) * kl).mean()


def relation_distance(s_tokens: Tensor, t_tokens: Tensor) -> Tensor:
    """LLaVA-KD-style RDist per sample: 1 - cos between the flattened off-diagonal parts of the
    student's and the teacher's token self-correlation (cosine Gram) matrices. `[B, L, C_s]`,
    `[B, L, C_t]` -> `[B]` (0 when the two token sets relate to each other alike)."""
    g_s, g_t = cosine_gram(s_tokens.float()), cosine_gram(t_tokens.float())
    B, L, _ = g_s.shape
    mask = ~torch.eye(L, dtype=torch.bool, device=g_s.device)
    return 1.0 - F.cosine_similarity(g_s[:, mask].view(B, -1), g_t[:, mask].view(B, -1), dim=-1)


def _tokens(x: Tensor) -> Tensor:
    return x.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]


def _mlp(d_in: int, d_hidden: int, d_out: int, act: nn.Module) -> nn.Sequential:
    """Linear -> BatchNorm -> activation -> Linear (PromptKD's projector, C2KD's proxy head)."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.BatchNorm1d(d_hidden), act, nn.Linear(d_hidden, d_out))


# --------------------------------------------------------------------------------------------
# No teacher
# --------------------------------------------------------------------------------------------


class ScratchStudent(Distiller):
    """No teacher: CLIP's symmetric InfoNCE on the student's final embeddings."""

    group_names = ("student",)
    required_targets = ()

    def __init__(self, student: DualEncoder):
        super().__init__(student, None)
        # features arrive already gathered across ranks (cmapkd.distill.ddp), so the loss is local
        self.clip_loss = ClipLoss()

    def group_modules(self) -> dict[str, list]:
        return {"student": [self.student]}

    def compute_features(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        img = self.student.image(self.student.image.prepare(batch["images"]))
        txt = self.student.text(batch["text_ids"], batch["text_mask"])
        return {
            "image_features": F.normalize(img.embedding, dim=-1),
            "text_features": F.normalize(txt.embedding, dim=-1),
            "logit_scale": self.student.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp().expand(1),
        }

    def compute_losses(self, f: Mapping[str, Tensor]) -> dict[str, Tensor]:
        task = self.clip_loss(f["image_features"], f["text_features"], f["logit_scale"][0])
        return {"task": task, "total": task, "diag/logit_scale": f["logit_scale"][0].detach()}


# --------------------------------------------------------------------------------------------
# Shared part of the teacher-based baselines
# --------------------------------------------------------------------------------------------


class TeacherBaseline(Distiller):
    """Student + task loss + teacher targets; subclasses add `_features` and `_losses`.

    Features (batch-first, gathered across ranks by the loop): `image_features`, `text_features`
    (the student's L2-normalised final embeddings), `logit_scale` (0-dim, exp of the clamped
    learned scale), `t_img`, `t_txt` (the teacher's normalised final embeddings), plus the
    subclass's own."""

    group_names: tuple[str, ...] = ("student",)
    required_targets: tuple[str, ...] = EMB_TARGETS
    needs_teacher_dims = False

    def __init__(self, student: DualEncoder, cfg, teacher: DualEncoder | None = None,
                 teacher_dims: TeacherDims | None = None):
        super().__init__(student, teacher)
        if teacher_dims is None and teacher is not None:
            teacher_dims = TeacherDims.from_encoder(teacher)
        if self.needs_teacher_dims and teacher_dims is None:
            raise ValueError(f"{type(self).__name__} needs the teacher or its TeacherDims (from the cache)")
        self.teacher_dims = teacher_dims
        self.cfg = cfg  # BaselinesParams (cmapkd.config)
        self.task_weight = float(cfg.task_weight)
        self.teacher_logit_scale = float(cfg.teacher_logit_scale)
        self.grids = pyramid_grids(student.image.image_size)
        self.clip_loss = ClipLoss()

    def group_modules(self) -> dict[str, list]:
        return {"student": [self.student]}

    def student_grids(self) -> list[tuple[int, int]]:
        return list(self.grids)

    def compute_features(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        t = self.targets_from_batch(batch)
        img = self.student.image(self.student.image.prepare(batch["images"]))
        txt = self.student.text(batch["text_ids"], batch["text_mask"])
        f = {
            "image_features": F.normalize(img.embedding, dim=-1),
            "text_features": F.normalize(txt.embedding, dim=-1),
            "logit_scale": self.student.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp(),
            "t_img": F.normalize(t["t_img_emb"].float(), dim=-1),  # fp16 cache rows: re-normalise
            "t_txt": F.normalize(t["t_txt_emb"].float(), dim=-1),
        }
        f.update(self._features(img, txt, t, f))
        return f

    def _features(self, img: TowerOutput, txt: TowerOutput, t: Mapping[str, Tensor], f: dict) -> dict[str, Tensor]:
        return {}

    def _losses(self, f: Mapping[str, Tensor]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def student_logits(self, f: Mapping[str, Tensor]) -> Tensor:
        return f["logit_scale"] * f["image_features"] @ f["text_features"].T

    def teacher_logits(self, f: Mapping[str, Tensor]) -> Tensor:
        return self.teacher_logit_scale * f["t_img"] @ f["t_txt"].T

    def compute_losses(self, f: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {"task": self.task_weight * self.clip_loss(f["image_features"], f["text_features"], f["logit_scale"])}
        out.update(self._losses(f))
        out["total"] = sum(v for k, v in out.items() if not k.startswith("diag/"))
        out["diag/logit_scale"] = f["logit_scale"].detach()
        return out


# --------------------------------------------------------------------------------------------
# KD, FitNet, CLIP-KD: apply to CLIP -> CLIP directly
# --------------------------------------------------------------------------------------------


class KDDistiller(TeacherBaseline):
    """Hinton KD on CLIP (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network",
    2015), in the form open_clip's `DistillClipLoss` applies it to CLIP: the student's and the
    teacher's in-batch image->text and text->image similarity distributions (each model with its own
    logit scale) are matched with T^2 * KL(teacher || student) at temperature
    `baselines.kd.temperature`, averaged over the two directions; plus the task loss.

    `kd` = weight * (KL_i2t + KL_t2i) / 2. With T = 1 its gradient is that of `DistillClipLoss`
    (which writes it as a cross-entropy, KL + the teacher's entropy)."""

    def _losses(self, f):
        cfg = self.cfg.kd
        i2t, t2i = in_batch_kd(self.student_logits(f), self.teacher_logits(f), cfg.temperature)
        return {"kd": cfg.weight * 0.5 * (i2t + t2i), "diag/kd_i2t": i2t.detach(), "diag/kd_t2i": t2i.detach()}


class FitNetDistiller(TeacherBaseline):
    """FitNet hints (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015; RepDistiller
    `HintLoss` + regressor): a middle student tap passes through a learned regressor (group
    `adapters`) and is regressed onto the teacher's tap of the same level, on both towers:

    - image: student tap `fitnet.vis_level` `[B, C_s, h, w]` (its own grid) -> 1x1 conv to the
      teacher's channels; target `t_vis_l{level}` resampled (parameter-free) to the student's grid;
    - text: the student's language level `fitnet.txt_level` (the same parameter-free pooling as the
      teacher's, cmapkd.models.ucmp.language_levels) -> linear to the teacher's width; target
      `t_txt_l{level}`.

    Distance per sample: squared L2 distance over channels, averaged over positions, of the
    channel-L2-normalised features when `fitnet.normalize` (scale-free, as CMAPKD's intra term) or of
    the raw features otherwise (= FitNet's MSE x C_t). `fitnet_v` / `fitnet_l` = weight x the batch
    mean. Single stage: the hint and the task loss train together (FitNet's first, hint-only stage
    is not run; see docs/baselines.md)."""

    group_names = ("student", "adapters")
    needs_teacher_dims = True

    def __init__(self, student, cfg, teacher=None, teacher_dims=None):
        super().__init__(student, cfg, teacher, teacher_dims)
        fc = cfg.fitnet
        for key in ("vis_level", "txt_level"):
            if not 1 <= getattr(fc, key) <= 4:
                raise ValueError(f"baselines.fitnet.{key}: expected a level in 1..4, got {getattr(fc, key)}")
        self.vis_level, self.txt_level = fc.vis_level - 1, fc.txt_level - 1
        self.required_targets = EMB_TARGETS + (f"t_vis_l{fc.vis_level}", f"t_txt_l{fc.txt_level}")
        dims = self.teacher_dims
        self.regressors = nn.ModuleDict({
            "vis": nn.Conv2d(student.image.level_channels[self.vis_level], dims.vis_channels[self.vis_level], 1),
            "txt": nn.Linear(student.text.level_dims[self.txt_level], dims.txt_dims[self.txt_level]),
        })

    def group_modules(self):
        return {"student": [self.student], "adapters": [self.regressors]}

    def _distance(self, s: Tensor, t: Tensor, dim: int) -> Tensor:
        if self.cfg.fitnet.normalize:
            return normalized_sq_distance(s, t, dim=dim, reduction="sum")
        d = (s - t).pow(2).sum(dim=dim)
        return d.flatten(1).mean(1) if d.dim() > 1 else d

    def _features(self, img, txt, t, f):
        s_map = img.levels[self.vis_level]
        t_map = resample(t[f"t_vis_l{self.vis_level + 1}"].float(), s_map.shape[-2:])
        s_vec = language_levels(txt)[self.txt_level]
        return {
            "fitnet_v": self._distance(self.regressors["vis"](s_map), t_map, dim=1),
            "fitnet_l": self._distance(self.regressors["txt"](s_vec), t[f"t_txt_l{self.txt_level + 1}"].float(), dim=-1),
        }

    def _losses(self, f):
        w = self.cfg.fitnet.weight
        return {"fitnet_v": w * f["fitnet_v"].mean(), "fitnet_l": w * f["fitnet_l"].mean()}


class CLIPKDHeads(nn.Module):
    """CLIP-KD's student-side modules (`KDClipLoss`): linear maps of the student embeddings into the
    teacher's width (identity when the widths agree, as in CLIP-KD) and the learnable
    `cross_logit_scale` of ICL (initialised at ln(1/0.07))."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        same = student_dim == teacher_dim
        self.visual_proj = nn.Identity() if same else nn.Linear(student_dim, teacher_dim)
        self.text_proj = nn.Identity() if same else nn.Linear(student_dim, teacher_dim)
        self.cross_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


class CLIPKDDistiller(TeacherBaseline):
    """CLIP-KD (Yang et al., "CLIP-KD: An Empirical Study of CLIP Model Distillation", CVPR 2024;
    winycg/CLIP-KD `src/open_clip/loss.py` `KDClipLoss`), the final recipe CRD + ICL + FD on the
    final embeddings, plus the task loss:

    - `crd` (CLIP-KD's "CRD", `ckd_loss`): KL(teacher || student) at T = 1 on the in-batch
      image->text and text->image distributions, batch-mean, averaged over the two directions;
    - `icl` (interactive contrastive learning): InfoNCE of the projected, normalised student image
      embedding against the teacher's text embeddings, and of the student text against the teacher
      images, with the learnable `cross_logit_scale` (clamped at 100), averaged;
    - `fd` (feature distillation): F.mse_loss (mean over elements) between the projected,
      L2-normalised student embeddings and the teacher's, image + text.

    Weights `baselines.clipkd.{crd,icl,fd}_weight`; CLIP-KD's script uses 1, 1, 2000. The
    projections and the cross scale are the `adapters` group."""

    group_names = ("student", "adapters")
    needs_teacher_dims = True

    def __init__(self, student, cfg, teacher=None, teacher_dims=None):
        super().__init__(student, cfg, teacher, teacher_dims)
        self.heads = CLIPKDHeads(student.image.embed_dim, self.teacher_dims.embed_dim)

    def group_modules(self):
        return {"student": [self.student], "adapters": [self.heads]}

    def _features(self, img, txt, t, f):
        return {
            "img_proj": F.normalize(self.heads.visual_proj(img.embedding), dim=-1),
            "txt_proj": F.normalize(self.heads.text_proj(txt.embedding), dim=-1),
        }

    def _losses(self, f):
        cfg = self.cfg.clipkd
        crd_i2t, crd_t2i = in_batch_kd(self.student_logits(f), self.teacher_logits(f), 1.0)
        scale = self.heads.cross_logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
        labels = torch.arange(f["img_proj"].shape[0], device=f["img_proj"].device)
        icl = 0.5 * (F.cross_entropy(scale * f["img_proj"] @ f["t_txt"].T, labels)
                     + F.cross_entropy(scale * f["txt_proj"] @ f["t_img"].T, labels))
        fd_img, fd_txt = F.mse_loss(f["img_proj"], f["t_img"]), F.mse_loss(f["txt_proj"], f["t_txt"])
        return {
            "crd": cfg.crd_weight * 0.5 * (crd_i2t + crd_t2i),
            "icl": cfg.icl_weight * icl,
            "fd": cfg.fd_weight * (fd_img + fd_txt),
            "diag/fd_img": fd_img.detach(),
            "diag/fd_txt": fd_txt.detach(),
            "diag/cross_logit_scale": scale.detach(),
        }


# --------------------------------------------------------------------------------------------
# Adapted methods (not CLIP -> CLIP in their papers; docs/baselines.md)
# --------------------------------------------------------------------------------------------


class PromptKDAdapted(TeacherBaseline):
    """PromptKD-adapted. PromptKD (Li et al., "PromptKD: Unsupervised Prompt Distillation for
    Vision-Language Models", CVPR 2024; zhengli97/PromptKD `trainers/promptkd.py`) trains a CLIP
    student's image encoder (deep visual prompts + a 2-layer projector 512 -> 768) so that
    `logit_scale * proj(img_s) @ teacher_text^T` matches the teacher's logits over the teacher's
    stored class-name text features, with temperature-scaled KL only (CE weight 0), and classifies at
    test time with the student image encoder + the teacher's stored text features.

    Adapted for CLIP -> CLIP retrieval:
    - the teacher's "class vectors" are the teacher's text embeddings of the in-batch captions
      (`t_txt_emb`, what the cache stores); the teacher logits are `teacher_logit_scale * t_img @
      t_txt^T`; `promptkd_img` = weight * mean over images of T^2 KL(teacher row || student row),
      student row = student scale * norm(proj_img(img_s)) @ t_txt^T (PromptKD's forward_backward,
      normalised per row instead of per element: PromptKD divides the summed KL by N x classes and
      uses KD_WEIGHT 1000 in its scripts);
    - projector: Linear -> BatchNorm -> ReLU -> Linear, student width -> teacher width -> teacher
      width (PromptKD's `Feature_Trans_Module_two_layer`), group `adapters`;
    - no prompts: the whole student trains (the student is trained from random weights here, so
      there is no frozen pretrained backbone to prompt);
    - retrieval is scored with the student's own two towers (the efficiency comparison requires it),
      so the student's text tower must learn too: the task loss (absent in PromptKD) aligns the two
      student towers, and with `promptkd.symmetric` the mirror term `promptkd_txt` distils the text
      side in the same way (student text through its own projector against the teacher's image
      embeddings, target: the teacher's text->image rows)."""

    group_names = ("student", "adapters")
    needs_teacher_dims = True

    def __init__(self, student, cfg, teacher=None, teacher_dims=None):
        super().__init__(student, cfg, teacher, teacher_dims)
        e_s, e_t = student.image.embed_dim, self.teacher_dims.embed_dim
        self.projectors = nn.ModuleDict({"img": _mlp(e_s, e_t, e_t, nn.ReLU())})
        if cfg.promptkd.symmetric:
            self.projectors["txt"] = _mlp(e_s, e_t, e_t, nn.ReLU())

    def group_modules(self):
        return {"student": [self.student], "adapters": [self.projectors]}

    def _features(self, img, txt, t, f):
        out = {"img_proj": F.normalize(self.projectors["img"](img.embedding), dim=-1)}
        if "txt" in self.projectors:
            out["txt_proj"] = F.normalize(self.projectors["txt"](txt.embedding), dim=-1)
        return out

    def _losses(self, f):
        cfg = self.cfg.promptkd
        t_logits = self.teacher_logits(f)
        s_img = f["logit_scale"] * f["img_proj"] @ f["t_txt"].T
        out = {"promptkd_img": cfg.weight * kl_per_row(s_img, t_logits, cfg.temperature).mean()}
        if "txt_proj" in f:
            s_txt = f["logit_scale"] * f["txt_proj"] @ f["t_img"].T
            out["promptkd_txt"] = cfg.weight * kl_per_row(s_txt, t_logits.T, cfg.temperature).mean()
        return out


class C2KDProxy(nn.Module):
    """A C2KD proxy head: `mlp(x)`, or `base(x) + mlp(x)` with the MLP's last layer zeroed, so the
    proxy starts as `base` (a copy of the student's aligned level head) and learns a residual."""

    def __init__(self, mlp: nn.Sequential, base: nn.Module | None = None):
        super().__init__()
        self.mlp = mlp
        self.base = base
        if base is not None:
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self.mlp(x)
        return y if self.base is None else self.base(x) + y


class C2KDAdapted(TeacherBaseline):
    """C2KD-adapted. C2KD (Huo et al., "C2KD: Bridging the Modality Gap for Cross-Modal Knowledge
    Distillation", CVPR 2024; huofushuo/C2KD `*/utils/helper.py` `train_network_distill`) distils
    between two *modalities* with class labels: proxy heads on an intermediate feature of teacher
    and student, bidirectional KL between each proxy and its own main head, on-the-fly selection
    (OFSD: per sample, the Kendall rank correlation of teacher-proxy and student-proxy logits; only
    samples with tau > `krc` get cross-modal KD), cross-modal KD on the non-target classes only
    (`ntkl`), and a teacher that is trained too (student -> teacher KD).

    Adapted for CLIP -> CLIP with a frozen (cacheable) teacher:
    - "classes" are the in-batch candidates: an image's row of image->text logits, a caption's row
      of text->image logits; the target class is the diagonal (the paired item);
    - student proxy: heads (Linear -> BatchNorm -> LeakyReLU(0.1) -> Linear, as C2KD's
      `Stu`: conv1x1-BN-LeakyReLU + fc) on the student's level `c2kd.proxy_level` (image: spatial
      mean of that tap; text: language level of that tap) into the student's embedding width; proxy
      logits = student scale * norm(proxy_img) @ norm(proxy_txt)^T; group `adapters`;
    - proxy start (`c2kd.proxy_init`): `aligned` (default) adds to each MLP a copy of the
      student's own level head at that level (`level_embed`, aligned by `student_init` with the
      main heads) and zero-initialises the MLP's last layer, so the proxy starts as the aligned
      level-`proxy_level` retrieval head of the student and the MLP learns a residual. In C2KD the
      student and its proxy start equally untrained; with a pretrained, aligned student, a random
      proxy (`random`, C2KD's literal init) starts far flatter than the main head, and the
      bidirectional KL then pulls the main logits flat, which at a CLIP logit scale crowds the
      image embeddings (docs/regime_search.md, C2KD-adapted);
    - `c2kd_proxy` = proxy_weight * bidirectional KL between the proxy and the student's main
      logits (each direction with the other side detached, as C2KD), both axes;
    - teacher side: the teacher is frozen, so it has no trainable proxy and learns nothing from the
      student; its "proxy" logits are its main logits (`teacher_logit_scale * t_img @ t_txt^T`);
      the teacher CE, teacher<->proxy KL and student->teacher KD terms of C2KD are dropped;
    - OFSD: Kendall tau-b (scipy's default variant, computed exactly in torch) between each teacher
      row and the student-proxy row; rows with tau > `c2kd.krc` (C2KD's default 0.0) are kept;
    - `c2kd_ntkd` = ntkd_weight * non-target KD from the teacher rows to the student-proxy rows,
      masked by OFSD, averaged over all rows, both axes (the target is removed from the softmax;
      C2KD's `ntkl` zeroes the target logit instead, which keeps it in the softmax as a logit 0)."""

    group_names = ("student", "adapters")

    def __init__(self, student, cfg, teacher=None, teacher_dims=None):
        super().__init__(student, cfg, teacher, teacher_dims)
        lv = cfg.c2kd.proxy_level
        if not 1 <= lv <= 4:
            raise ValueError(f"baselines.c2kd.proxy_level: expected a level in 1..4, got {lv}")
        self.proxy_level = lv - 1
        e = student.image.embed_dim
        c_v, d_l = student.image.level_channels[self.proxy_level], student.text.level_dims[self.proxy_level]
        if cfg.c2kd.proxy_init == "aligned":
            bases = (student.image.level_head(self.proxy_level), student.text.level_head(self.proxy_level))
        else:
            bases = (None, None)
        self.proxies = nn.ModuleDict({"img": C2KDProxy(_mlp(c_v, c_v, e, nn.LeakyReLU(0.1)), bases[0]),
                                      "txt": C2KDProxy(_mlp(d_l, d_l, e, nn.LeakyReLU(0.1)), bases[1])})

    def group_modules(self):
        return {"student": [self.student], "adapters": [self.proxies]}

    def _features(self, img, txt, t, f):
        v = img.levels[self.proxy_level].mean(dim=(2, 3))
        l = language_levels(txt)[self.proxy_level]
        return {"proxy_img": F.normalize(self.proxies["img"](v), dim=-1),
                "proxy_txt": F.normalize(self.proxies["txt"](l), dim=-1)}

    def _losses(self, f):
        cfg = self.cfg.c2kd
        main = self.student_logits(f)
        proxy = f["logit_scale"] * f["proxy_img"] @ f["proxy_txt"].T
        teacher = self.teacher_logits(f)
        proxy_terms, ntkd_terms, kept, taus = [], [], [], []
        for m, p, t in ((main, proxy, teacher), (main.T, proxy.T, teacher.T)):
            proxy_terms.append(kl_per_row(p, m.detach(), cfg.temperature).mean()
                               + kl_per_row(m, p.detach(), cfg.temperature).mean())
            tau = kendall_tau_b(t, p)
            keep = (tau > cfg.krc).float()
            ntkd_terms.append(non_target_kd(p, t, keep, cfg.temperature))
            kept.append(keep.mean())
            taus.append(tau.mean())
        return {
            "c2kd_ntkd": cfg.ntkd_weight * 0.5 * (ntkd_terms[0] + ntkd_terms[1]),
            "c2kd_proxy": cfg.proxy_weight * 0.5 * (proxy_terms[0] + proxy_terms[1]),
            "diag/c2kd_kept_frac": 0.5 * (kept[0] + kept[1]),
            "diag/c2kd_kendall": 0.5 * (taus[0] + taus[1]),
        }


class LLaVAKDAdapted(TeacherBaseline):
    """LLaVA-KD-adapted. LLaVA-KD (Cai et al., "LLaVA-KD: A Framework of Distilling Multimodal Large
    Language Models", arXiv 2410.16236, ICCV 2025; Fantasyele/LLaVA-KD has evaluation code only)
    distils an MLLM with MDist (KL between teacher and student output distributions over the
    vocabulary, at the response tokens and at the visual tokens) and RDist (the student's
    self-correlation matrix of its visual tokens pulled towards the teacher's), in three stages
    (distilled pre-training, SFT, distilled fine-tuning).

    Adapted for a CLIP dual encoder (no LLM, no vocabulary, no generated tokens):
    - `mdist_res` (MDist, response part): the model's "output distribution" is its in-batch
      similarity distribution, so KL(teacher || student) at T = `llavakd.temperature` on the
      image->text and text->image rows, averaged (the same loss as KD);
    - `mdist_vis` (MDist, visual part): the distribution the visual side produces on its own, its
      in-batch image->image similarity distribution (self-similarity excluded), teacher vs student;
    - `rdist` (RDist): the cosine self-correlation matrix of the visual tokens of level
      `llavakd.rdist_level` (student tap resampled to the grid of the cached teacher map
      `t_vis_l{level}`), 1 - cos between the student's and the teacher's matrices (off-diagonal
      entries), averaged over images; parameter-free, so widths need not match;
    - one stage: all terms + the task loss from the first step (a dual encoder has no separate
      projector-alignment / instruction-tuning phases). No learned modules beyond the student."""

    def __init__(self, student, cfg, teacher=None, teacher_dims=None):
        super().__init__(student, cfg, teacher, teacher_dims)
        lv = cfg.llavakd.rdist_level
        if not 1 <= lv <= 4:
            raise ValueError(f"baselines.llavakd.rdist_level: expected a level in 1..4, got {lv}")
        self.rdist_level = lv - 1
        self.required_targets = EMB_TARGETS + (f"t_vis_l{lv}",)

    def _features(self, img, txt, t, f):
        t_map = t[f"t_vis_l{self.rdist_level + 1}"].float()
        s_map = resample(img.levels[self.rdist_level], t_map.shape[-2:])
        return {"rdist": relation_distance(_tokens(s_map), _tokens(t_map))}

    def _losses(self, f):
        cfg = self.cfg.llavakd
        i2t, t2i = in_batch_kd(self.student_logits(f), self.teacher_logits(f), cfg.temperature)
        s_vis = off_diagonal(f["logit_scale"] * f["image_features"] @ f["image_features"].T)
        t_vis = off_diagonal(self.teacher_logit_scale * f["t_img"] @ f["t_img"].T)
        vis = kl_per_row(s_vis, t_vis, cfg.temperature).mean() if s_vis.shape[1] > 0 else s_vis.sum() * 0.0
        return {
            "mdist_res": cfg.mdist_res_weight * 0.5 * (i2t + t2i),
            "mdist_vis": cfg.mdist_vis_weight * vis,
            "rdist": cfg.rdist_weight * f["rdist"].mean(),
        }


# --------------------------------------------------------------------------------------------
# Registry and factory
# --------------------------------------------------------------------------------------------

BASELINES: dict[str, type] = {
    "scratch": ScratchStudent,
    "kd": KDDistiller,
    "fitnet": FitNetDistiller,
    "clipkd": CLIPKDDistiller,
    "promptkd": PromptKDAdapted,
    "c2kd": C2KDAdapted,
    "llavakd": LLaVAKDAdapted,
}


def _check_name(name: str) -> type:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline '{name}'; known baselines: {', '.join(BASELINES)}")
    return BASELINES[name]


def _section(params):
    cfg = getattr(params, "baselines", None)
    if cfg is None:
        raise ValueError("params.baselines is not loaded: pass 'baselines' to load_params([...])")
    return cfg


def build_baseline(name: str, params, student: DualEncoder, teacher: DualEncoder | None = None,
                   teacher_dims: TeacherDims | None = None) -> Distiller:
    """The baseline `name` (a key of `BASELINES`) around `student`, configured by
    `params.baselines`. `teacher`: the frozen teacher for online targets (None: cached targets in
    the batch); `teacher_dims`: the teacher's widths when it is not attached (from the cache)."""
    cls = _check_name(name)
    if cls is ScratchStudent:
        return ScratchStudent(student)
    return cls(student, _section(params), teacher=teacher, teacher_dims=teacher_dims)


def baseline_lrs(name: str, params) -> dict[str, float]:
    """Peak learning rate of each optimizer group of baseline `name`: `baselines.<name>.lr` for the
    student and the method's adapters alike."""
    cls = _check_name(name)
    return {g: float(getattr(_section(params), name).lr) for g in cls.group_names}


__all__ = [
    "BASELINES",
    "C2KDAdapted",
    "C2KDProxy",
    "CLIPKDDistiller",
    "FitNetDistiller",
    "KDDistiller",
    "LLaVAKDAdapted",
    "PromptKDAdapted",
    "ScratchStudent",
    "TeacherBaseline",
    "baseline_lrs",
    "build_baseline",
    "in_batch_kd",
    "kendall_tau_b",
    "kl_per_row",
    "non_target_kd",
    "off_diagonal",
    "relation_distance",
]
