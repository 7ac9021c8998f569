"""The teacher: train the embedded teacher's heads on its own objective, save them, load them back.

Embedded default (`model.teacher.kind: towers`, EfficientNet-Lite2 + all-MiniLM-L6-v2): the
pretrained backbones are frozen (LiT-style) and only the heads are trained, contrastively, on the
train split: the final projections of both towers (`image.proj`, `text.proj`), the per-level heads
(`image.level_heads`, `text.level_heads`: what `compute_teacher_targets` uses for `t_vis_pool` /
`t_txt_pool`) and the logit scale. METHOD.md 2.4 allows a teacher-side adapter only if it is trained
on the teacher's own objective first and then frozen; the objective here is

    L = InfoNCE(final image emb, final text emb)
        + level_loss_weight * mean_{(i, j) in pairs} InfoNCE(level_embed(i, GAP(P_i)), level_embed(j, L_j))

(symmetric, open_clip ClipLoss-style, one learned logit scale clamped at ln 100; pairs = all 16
(i, j) or the diagonal), with exactly the vectors `teacher_image_targets` / `teacher_text_targets`
feed to `level_embed`: the spatial mean of image level i and `language_levels(...)` of the text
tower output (reused from cmapkd.models.ucmp, not re-implemented). Each image is paired with one of
its captions per epoch, chosen from (seed, epoch, image index).

With `tune_last_blocks: 0` the backbones are frozen, so their features (pooled final image features,
the four GAP'd image levels, the text tower's proj input and L1..L4 for every caption) are computed
once under `torch.inference_mode` and the heads are trained on them (seconds). With N > 0 the last N
blocks of each backbone (EfficientNet: the last N MBConv blocks + conv_head/bn2; MiniLM: the last N
layers) are tuned too (lr * tune_lr_scale, towers kept in eval mode: BatchNorm statistics and dropout
stay as pretrained) and every step runs the full forward (slow).

Paper setting (`kind: open_clip`, ViT-L-14 from a tag or a local checkpoint): nothing is trained;
the teacher stage records its identity and val retrieval in spec.json and writes no weights.

Outputs of the stage (`models/teacher/`): `teacher.safetensors` (the trained entries of
`DualEncoder.state_dict()`, under their state-dict names: `image.proj.weight`,
`image.level_heads.0.weight`, ..., `text.proj.bias`, `text.level_heads.3.bias`, `_logit_scale`, plus
the tuned blocks' entries when tune_last_blocks > 0) and `spec.json` (identity, encoder spec,
training params, data digest, metrics). `load_teacher(params.model, "models/teacher")` gives the
frozen teacher back.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmapkd.models.encoders import DualEncoder, build_encoder, freeze
from cmapkd.models.towers import TowerOutput, length_batches
from cmapkd.models.ucmp import language_levels

log = logging.getLogger("cmapkd.teacher")

WEIGHTS_FILE = "teacher.safetensors"
SPEC_FILE = "spec.json"
SPEC_FORMAT = "cmapkd-teacher/1"
LOGIT_SCALE_MAX = math.log(100.0)  # open_clip clamps the log scale at ln 100
LOGIT_SCALE_KEY = "_logit_scale"


class TeacherError(ValueError):
    """A teacher weights/spec file does not match the teacher built from params."""


# --------------------------------------------------------------------------------------------
# What is trained
# --------------------------------------------------------------------------------------------


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of the teacher")


def tuned_blocks(teacher: DualEncoder, n: int) -> list[nn.Module]:
    """The last `n` blocks of each backbone (towers kind; `DualEncoder.last_blocks`)."""
    try:
        return teacher.last_blocks(n)
    except ValueError as e:
        raise ValueError(f"teacher.tune_last_blocks = {n}: {e}") from e


def trained_keys(teacher: DualEncoder, tune_last_blocks: int = 0) -> list[str]:
    """State-dict names of everything the teacher stage trains (and saves), in state-dict order."""
    prefixes = [_module_name(teacher, m) + "." for m in teacher.heads() + tuned_blocks(teacher, tune_last_blocks)]
    keys = [k for k in teacher.state_dict() if k == LOGIT_SCALE_KEY or any(k.startswith(p) for p in prefixes)]
    if LOGIT_SCALE_KEY not in keys:
        raise ValueError("the teacher has no '_logit_scale' parameter (open_clip teachers are not trained here)")
    return keys


def reset_heads(teacher: DualEncoder, seed: int) -> None:
    """Re-initialise the heads (torch defaults) and the logit scale (ln 1/0.07) from `seed` alone,
    so 'random heads' do not depend on what drew from the global RNG before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for head in teacher.heads():
            for m in head.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
    with torch.no_grad():
        teacher.logit_scale.fill_(math.log(1 / 0.07))


# --------------------------------------------------------------------------------------------
# Features of the frozen backbones
# --------------------------------------------------------------------------------------------


@dataclass
class Features:
    """Frozen-backbone features of one split: image rows per image, text rows per caption."""

    img_final: Tensor  # [N, F_v]: input of image.proj
    img_levels: list[Tensor]  # 4 x [N, C_i]: GAP of image level i (input of image.level_embed(i))
    txt_final: Tensor  # [M, F_t]: input of text.proj
    txt_levels: list[Tensor]  # 4 x [M, D_j]: L1..L4 (input of text.level_embed(j))
    offsets: Tensor  # [N + 1] long: captions of image i are rows offsets[i]:offsets[i+1]

    @property
    def n_images(self) -> int:
        return int(self.img_final.shape[0])

    @staticmethod
    def concat(parts: Sequence["Features"]) -> "Features":
        """The rows of several splits as one (caption offsets shifted)."""
        if len(parts) == 1:
            return parts[0]
        offsets, base = [parts[0].offsets[:1]], 0
        for f in parts:
            offsets.append(f.offsets[1:] + base)
            base += int(f.offsets[-1])
        return Features(torch.cat([f.img_final for f in parts]),
                        [torch.cat([f.img_levels[i] for f in parts]) for i in range(4)],
                        torch.cat([f.txt_final for f in parts]),
                        [torch.cat([f.txt_levels[j] for f in parts]) for j in range(4)], torch.cat(offsets))

    def to(self, device) -> "Features":
        return Features(self.img_final.to(device), [v.to(device) for v in self.img_levels], self.txt_final.to(device),
                        [v.to(device) for v in self.txt_levels], self.offsets)


class _ProjInput:
    """Captures the input of a tower's `proj` (the pooled features the final embedding is made from)."""

    def __init__(self, proj: nn.Module):
        self.value: Tensor | None = None
        self._h = proj.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.value = args[0]

    def remove(self) -> None:
        self._h.remove()


def image_level_vectors(out: TowerOutput) -> list[Tensor]:
    """What `teacher_image_targets` feeds to `image.level_embed(i, .)`: the spatial mean of level i."""
    return [lv.mean(dim=(2, 3)) for lv in out.levels]


def _images_tensor(images, idx: Sequence[int] | slice) -> Tensor:
    arr = np.asarray(images[idx])
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)


def extract_features(teacher: DualEncoder, ds, batch_size: int = 128, progress: bool = True,
                     device: torch.device | str = "cpu", desc: str = "") -> Features:
    """Run the frozen towers once over a split (`ImageTextDataset`) and keep what the heads read."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    n = len(ds)
    captions = [c for caps in ds.captions for c in caps]
    counts = [len(caps) for caps in ds.captions]
    if any(c == 0 for c in counts):
        i = counts.index(0)
        raise ValueError(f"{ds.root}: image {i} of split '{ds.split}' has no caption")
    offsets = torch.tensor([0, *np.cumsum(counts).tolist()], dtype=torch.long)
    img_final, img_levels = [], [[] for _ in range(4)]
    txt_final, txt_levels = [], [[] for _ in range(4)]
    hook_i, hook_t = _ProjInput(teacher.image.proj), _ProjInput(teacher.text.proj)
    try:
        with torch.inference_mode():
            for s in tqdm(range(0, n, batch_size), desc=f"{desc} image features", disable=not progress, unit="batch"):
                x = _images_tensor(ds.images, slice(s, min(s + batch_size, n))).to(device)
                out = teacher.image(teacher.image.prepare(x))
                img_final.append(hook_i.value.float().cpu())
                for i, v in enumerate(image_level_vectors(out)):
                    img_levels[i].append(v.float().cpu())
            # captions in batches of similar length (the text tower drops the common padding), put back in order
            all_ids, all_mask = teacher.tokenize(captions)
            batches, inverse = length_batches(all_mask, batch_size)
            for sel in tqdm(batches, desc=f"{desc} text features", disable=not progress, unit="batch"):
                out = teacher.text(all_ids[sel].to(device), all_mask[sel].to(device))
                txt_final.append(hook_t.value.float().cpu())
                for j, v in enumerate(language_levels(out)):
                    txt_levels[j].append(v.float().cpu())
    finally:
        hook_i.remove()
        hook_t.remove()
    # clone: inference tensors cannot be saved for backward
    cat = lambda xs: torch.cat(xs).clone()  # noqa: E731
    in_order = lambda xs: torch.cat(xs)[inverse].clone()  # noqa: E731
    return Features(cat(img_final), [cat(v) for v in img_levels], in_order(txt_final), [in_order(v) for v in txt_levels],
                    offsets)


def embed_features(teacher: DualEncoder, f: Features, img_rows=None, txt_rows=None) -> dict[str, Tensor]:
    """Apply the heads to (a subset of) the features: final embeddings `img_emb` [B, E], `txt_emb`
    [B', E] and level embeddings `img_lv` [B, 4, E], `txt_lv` [B', 4, E] (not normalised)."""
    sel = (lambda x, r: x if r is None else x[r])  # noqa: E731
    img_lv = torch.stack([teacher.image.level_embed(i, sel(v, img_rows)) for i, v in enumerate(f.img_levels)], dim=1)
    txt_lv = torch.stack([teacher.text.level_embed(j, sel(v, txt_rows)) for j, v in enumerate(f.txt_levels)], dim=1)
    return {"img_emb": teacher.image.proj(sel(f.img_final, img_rows)), "img_lv": img_lv,
            "txt_emb": teacher.text.proj(sel(f.txt_final, txt_rows)), "txt_lv": txt_lv}


def embed_batch(teacher: DualEncoder, images: Tensor, ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """The same four outputs as `embed_features`, by the full forward (tune_last_blocks > 0)."""
    io = teacher.image(teacher.image.prepare(images))
    to = teacher.text(ids, mask)
    img_lv = torch.stack([teacher.image.level_embed(i, v) for i, v in enumerate(image_level_vectors(io))], dim=1)
    txt_lv = torch.stack([teacher.text.level_embed(j, v) for j, v in enumerate(language_levels(to))], dim=1)
    return {"img_emb": io.embedding, "img_lv": img_lv, "txt_emb": to.embedding, "txt_lv": txt_lv}


# --------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------


def clip_infonce(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    """Symmetric InfoNCE of paired rows (open_clip ClipLoss, one rank): a, b [B, E] unnormalised."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = scale * a @ b.T
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def level_pairs_of(mode: str) -> list[tuple[int, int]]:
    if mode == "all":
        return [(i, j) for i in range(4) for j in range(4)]
    if mode == "diagonal":
        return [(i, i) for i in range(4)]
    raise ValueError(f"teacher.level_pairs must be 'all' or 'diagonal', got {mode!r}")


def teacher_objective(emb: dict[str, Tensor], logit_scale: Tensor, level_weight: float,
                      pairs: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
    """The teacher's own objective (module docstring): `final`, `level` (mean over pairs), `total`."""
    scale = logit_scale.exp()
    final = clip_infonce(emb["img_emb"], emb["txt_emb"], scale)
    level = torch.stack([clip_infonce(emb["img_lv"][:, i], emb["txt_lv"][:, j], scale) for i, j in pairs]).mean()
    return {"final": final, "level": level, "total": final + level_weight * level}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _rng(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A generator determined by (seed, epoch, stream) only."""
    s = np.random.SeedSequence([int(seed) % 2**32, int(epoch), int(stream)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1]))


def caption_choice(offsets: Tensor, seed: int, epoch: int) -> Tensor:
    """Flat caption row for every image in this epoch; image i's choice depends on (seed, epoch, i)."""
    n_caps = offsets[1:] - offsets[:-1]
    u = torch.rand(len(n_caps), generator=_rng(seed, epoch, 1), dtype=torch.float64)
    pick = torch.minimum((u * n_caps).long(), n_caps - 1)
    return offsets[:-1] + pick


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine to 0 at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(teacher: DualEncoder, tp, tuned: list[nn.Module]) -> list[dict]:
    head_ids = {id(p) for h in teacher.heads() for p in h.parameters()}
    groups = {"heads": [], "heads_no_wd": [], "tuned": [], "tuned_no_wd": []}
    seen = set()
    for name, p in teacher.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        part = "heads" if id(p) in head_ids or name == LOGIT_SCALE_KEY else "tuned"
        wd = p.ndim >= 2 and name != LOGIT_SCALE_KEY
        groups[part if wd else part + "_no_wd"].append(p)
    lrs = {"heads": tp.lr, "tuned": tp.lr * tp.tune_lr_scale}
    out = []
    for g, ps in groups.items():
        if ps:
            base = lrs[g.split("_")[0]]
            out.append({"name": g, "params": ps, "lr": base, "base_lr": base,
                        "weight_decay": tp.weight_decay if not g.endswith("_no_wd") else 0.0})
    return out


def set_trainable(teacher: DualEncoder, tune_last_blocks: int) -> list[nn.Module]:
    """Freeze everything, then unfreeze the heads, the logit scale and the tuned blocks. The towers
    stay in eval mode (BatchNorm statistics and dropout as pretrained: locked-image tuning)."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    tuned = tuned_blocks(teacher, tune_last_blocks)
    for m in teacher.heads() + tuned:
        for p in m.parameters():
            p.requires_grad_(True)
    teacher.logit_scale.requires_grad_(True)
    return tuned


@dataclass
class TrainLog:
    steps: int
    seconds: float
    first: dict[str, float]  # mean losses of the first epoch
    last: dict[str, float]  # mean losses of the last epoch
    logit_scale: float  # exp(log scale) at the end


def train_teacher(teacher: DualEncoder, tp, seed: int, train_feats: Features | None = None, train_ds=None,
                  device: torch.device | str = "cpu", progress: bool = True) -> TrainLog:
    """Train the heads (and the tuned blocks) in place. Frozen towers: from `train_feats`;
    tune_last_blocks > 0: full forward on `train_ds` (an ImageTextDataset) every step."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    tuned = set_trainable(teacher, tp.tune_last_blocks)
    full = tp.tune_last_blocks > 0
    if full and train_ds is None:
        raise ValueError("tune_last_blocks > 0 needs the train dataset (full forward every step)")
    if not full and train_feats is None:
        raise ValueError("frozen towers: pass the train features (extract_features)")
    if tp.batch_size < 2:
        raise ValueError(f"teacher.batch_size must be >= 2 for a contrastive loss, got {tp.batch_size}")
    if full:
        counts = [len(c) for c in train_ds.captions]
        offsets = torch.tensor([0, *np.cumsum(counts).tolist()], dtype=torch.long)
        flat_caps = [c for caps in train_ds.captions for c in caps]
        n = len(train_ds)
    else:
        feats = train_feats.to(device)
        offsets, n = train_feats.offsets, train_feats.n_images
    per_epoch = math.ceil(n / tp.batch_size)
    total = tp.epochs * per_epoch
    warmup = int(round(tp.warmup_frac * total))
    opt = torch.optim.AdamW(_param_groups(teacher, tp, tuned), lr=tp.lr, betas=(0.9, 0.98), eps=1e-6)
    pairs = level_pairs_of(tp.level_pairs)
    step, t0 = 0, time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    bar = tqdm(total=total, desc="teacher heads", disable=not progress, unit="step")
    for epoch in range(tp.epochs):
        perm = torch.randperm(n, generator=_rng(seed, epoch, 0))
        caps = caption_choice(offsets, seed, epoch)
        sums = {"final": 0.0, "level": 0.0, "total": 0.0}
        n_b = 0
        for s in range(0, n, tp.batch_size):
            rows = perm[s : s + tp.batch_size]
            if len(rows) < 2:
                continue
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, total, warmup)
            if full:
                idx = rows.sort().values  # the shard reader likes increasing indices; the order is irrelevant
                x = _images_tensor(train_ds.images, idx.tolist()).to(device)
                ids, mask = teacher.tokenize([flat_caps[int(c)] for c in caps[idx]])
                emb = embed_batch(teacher, x, ids.to(device), mask.to(device))
            else:
                emb = embed_features(teacher, feats, rows.to(device), caps[rows].to(device))
            loss = teacher_objective(emb, teacher.logit_scale, tp.level_loss_weight, pairs)
            opt.zero_grad(set_to_none=True)
            loss["total"].backward()
            if not torch.isfinite(loss["total"]):
                raise FloatingPointError(f"teacher loss is {float(loss['total'])} at step {step} (epoch {epoch})")
            opt.step()
            with torch.no_grad():
                teacher.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
            for k in sums:
                sums[k] += loss[k].item()
            n_b += 1
            step += 1
            bar.update(1)
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{loss['total'].item():.3f}", scale=f"{teacher.logit_scale.exp().item():.1f}")
        last = {k: v / max(1, n_b) for k, v in sums.items()}
        if epoch == 0:
            first = dict(last)
    bar.close()
    freeze(teacher)
    return TrainLog(step, time.perf_counter() - t0, first, last, float(teacher.logit_scale.detach().exp()))


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def encode_split(teacher: DualEncoder, ds, batch_size: int = 128, device: torch.device | str = "cpu",
                 progress: bool = True, desc: str = "") -> tuple[Tensor, Tensor]:
    """Final image and text embeddings of a split by the full forward (normalised, float32, CPU)."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    n = len(ds)
    captions = ds.flat_captions()
    img, txt = [], []
    for s in tqdm(range(0, n, batch_size), desc=f"{desc} images", disable=not progress, unit="batch"):
        img.append(teacher.encode_image(_images_tensor(ds.images, slice(s, min(s + batch_size, n))).to(device)).float().cpu())
    for s in tqdm(range(0, len(captions), batch_size), desc=f"{desc} captions", disable=not progress, unit="batch"):
        ids, mask = teacher.tokenize(captions[s : s + batch_size])
        txt.append(teacher.encode_text(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(img), torch.cat(txt)


def retrieval_metrics(img_emb: Tensor, txt_emb: Tensor, text_to_image: Sequence[int]) -> dict[str, float]:
    """CLIP_benchmark recall@1/5/10 both ways (all captions), flat keys (cmapkd.eval.retrieval)."""
    from cmapkd.eval.retrieval import flatten_retrieval, recall_at_k

    return flatten_retrieval(recall_at_k(img_emb, txt_emb, text_to_image, ks=(1, 5, 10)))


@torch.no_grad()
def feature_retrieval(teacher: DualEncoder, f: Features, text_to_image: Sequence[int]) -> dict[str, float]:
    """Retrieval with the current heads on precomputed features (the frozen-tower path)."""
    e = embed_features(teacher, f)
    return retrieval_metrics(e["img_emb"].cpu(), e["txt_emb"].cpu(), text_to_image)


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def head_state(teacher: DualEncoder, keys: Sequence[str]) -> dict[str, Tensor]:
    sd = teacher.state_dict()
    return {k: sd[k].detach().to("cpu").contiguous().clone() for k in keys}


def save_weights(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file, written to a temporary sibling and moved into place."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _encoder_spec(model_params):
    return model_params.teacher if hasattr(model_params, "teacher") else model_params


def read_spec(teacher_dir: str | Path) -> dict | None:
    path = Path(teacher_dir) / SPEC_FILE
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TeacherError(f"{path}: not valid JSON: {e}") from e
    if spec.get("format") != SPEC_FORMAT:
        raise TeacherError(f"{path}: format {spec.get('format')!r}, expected {SPEC_FORMAT!r}")
    return spec


def recorded_identity(model_params, teacher_dir: str | Path) -> dict | None:
    """The teacher identity the teacher stage recorded in spec.json, when that spec was written for
    the teacher that params describe now (same `model.teacher` section); None otherwise (then build
    the teacher with `load_teacher` and ask it). Lets a cached-target run check its cache without
    building the 28 M-parameter teacher (~1 s a run): `load_teacher` already checked this identity
    against the real weights when the cache stage ran."""
    from cmapkd.config import to_dict

    saved = read_spec(teacher_dir)
    if not saved or "identity" not in saved or saved.get("encoder_spec") != to_dict(_encoder_spec(model_params)):
        return None
    return saved["identity"]


def load_heads(teacher: DualEncoder, path: str | Path, expected: Sequence[str] | None = None) -> list[str]:
    """Load a teacher weights file into `teacher`, strictly: every head key and `_logit_scale` must be
    there (and exactly `expected` when given), every key must be a state-dict entry of the teacher,
    with its shape. Errors name the file and the keys."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: teacher weights not found (run `dvc repro teacher`)")
    try:
        sd = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise TeacherError(f"{path}: not a readable safetensors file: {e}") from e
    own = teacher.state_dict()
    need = list(expected) if expected is not None else trained_keys(teacher, 0)
    missing = [k for k in need if k not in sd]
    unknown = sorted(k for k in sd if k not in own)
    unexpected = sorted(k for k in sd if k in own and expected is not None and k not in set(expected))
    short = lambda ks: ", ".join(ks[:6]) + (f" ... ({len(ks)} in all)" if len(ks) > 6 else "")  # noqa: E731
    if missing:
        raise TeacherError(f"{path}: missing teacher weights: {short(missing)}")
    if unknown:
        raise TeacherError(f"{path}: keys that are not in the teacher ({teacher.name}): {short(unknown)}")
    if unexpected:
        raise TeacherError(f"{path}: keys not listed in {SPEC_FILE}: {short(unexpected)}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise TeacherError(f"{path}: tensor '{k}' has shape {tuple(v.shape)}, the teacher expects {tuple(own[k].shape)}")
        if v.dtype != own[k].dtype:
            raise TeacherError(f"{path}: tensor '{k}' has dtype {v.dtype}, the teacher expects {own[k].dtype}")
    result = teacher.load_state_dict(sd, strict=False)
    if result.unexpected_keys:  # cannot happen after the checks above
        raise TeacherError(f"{path}: unexpected keys {result.unexpected_keys}")
    return sorted(sd)


def load_teacher(model_params, teacher_dir: str | Path, check_identity: bool = True) -> DualEncoder:
    """The frozen teacher (eval mode, no parameter requires grad).

    `model_params`: `params.model` (or its `teacher` EncoderSpec). Towers kind: built from the spec,
    then `teacher_dir/teacher.safetensors` (written by the teacher stage) is loaded strictly.
    open_clip kind (paper): built from its pretrained tag (needs hub access: setting `paper`, or
    CMAPKD_ALLOW_HUB=1) or local checkpoint path; no weights file is needed. When
    `teacher_dir/spec.json` exists, the key list and (`check_identity`) the teacher identity recorded
    there must match, so a teacher built from changed params is an error, never silently used."""
    spec = _encoder_spec(model_params)
    teacher_dir = Path(teacher_dir)
    saved = read_spec(teacher_dir)
    if saved is not None and saved.get("encoder_spec", {}).get("kind") not in (None, spec.kind):
        raise TeacherError(f"{teacher_dir / SPEC_FILE}: teacher kind {saved['encoder_spec']['kind']!r}, params "
                           f"model.teacher.kind is {spec.kind!r} (rerun `dvc repro teacher`)")
    teacher = build_encoder(spec)
    if spec.kind == "towers":
        expected = saved.get("keys") if saved is not None else None
        load_heads(teacher, teacher_dir / WEIGHTS_FILE, expected)
    freeze(teacher)
    if saved is not None and check_identity and "identity" in saved:
        now = teacher.identity()
        if now != saved["identity"]:
            diff = sorted(k for k in set(now) | set(saved["identity"]) if now.get(k) != saved["identity"].get(k))
            raise TeacherError(f"{teacher_dir / SPEC_FILE}: the teacher built from params differs from the one the "
                               f"teacher stage recorded (fields: {', '.join(diff)}); rerun `dvc repro teacher`")
    return teacher


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _rounded(d: dict[str, float], nd: int = 6) -> dict[str, float]:
    return {k: round(float(v), nd) for k, v in d.items()}


ROLES = ("teacher", "student")


def run_teacher_stage(params, data_root: str | Path, out_dir: str | Path, metrics_path: str | Path | None = None,
                      progress: bool = True, device: torch.device | str | None = None, role: str = "teacher") -> dict:
    """The `teacher` stage: train (towers) or just record (open_clip) the teacher; write
    `out_dir/teacher.safetensors` (towers only) and `out_dir/spec.json` in one atomic folder
    replacement, and the metrics JSON. `params` needs seed, setting, model, teacher. Returns the
    metrics dict.

    `role="student"` is the `student_init` stage: the same routine on `model.student` with the
    `student_init` recipe, so the student starts from its pretrained towers with aligned heads
    (LiT-style) and the paper's open_clip student from its pretrained tag, recorded as it is."""
    from cmapkd import runtime
    from cmapkd.config import to_dict
    from cmapkd.data import ImageTextDataset, read_info
    from cmapkd.data.store import atomic_dir, atomic_write_bytes

    t_start = time.perf_counter()
    device = torch.device(device) if device is not None else runtime.get_device()
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    spec = params.model.teacher if role == "teacher" else params.model.student
    tp = params.teacher if role == "teacher" else params.student_init
    seed = params.seed
    data_root, out_dir = Path(data_root), Path(out_dir)
    info = read_info(data_root)
    # an open_clip encoder trains nothing here: only the train split is recorded
    splits = list(tp.splits) if spec.kind == "towers" else ["train"]
    if not splits:
        raise ValueError(f"{role}: {'teacher' if role == 'teacher' else 'student_init'}.splits is empty")
    train_sets = [ImageTextDataset(data_root, s) for s in splits]
    train_ds, val_ds = train_sets[0], ImageTextDataset(data_root, "val")
    t2i = val_ds.text_to_image()
    fbs = tp.feature_batch_size
    if fbs < 1:
        raise ValueError(f"teacher.feature_batch_size must be >= 1, got {fbs}")

    t0 = time.perf_counter()
    teacher = build_encoder(spec)
    trains = spec.kind == "towers"
    if trains and not spec.checkpoint:
        reset_heads(teacher, seed)
    teacher = freeze(teacher.to(device))
    times = {"build": time.perf_counter() - t0}
    metrics: dict[str, Any] = {"trained": trains}
    log_: TrainLog | None = None
    if not trains:  # paper setting: the pretrained CLIP as it is
        t0 = time.perf_counter()
        img, txt = encode_split(teacher, val_ds, fbs, device, progress, "val")
        metrics["val"] = _rounded(retrieval_metrics(img, txt, t2i))
        times["eval"] = time.perf_counter() - t0
        keys: list[str] = []
    elif tp.tune_last_blocks == 0:
        t0 = time.perf_counter()
        val_f = extract_features(teacher, val_ds, fbs, progress, device, "val")
        train_f = Features.concat([extract_features(teacher, ds, fbs, progress, device, ds.split) for ds in train_sets])
        times["features"] = time.perf_counter() - t0
        metrics["val_random_heads"] = _rounded(feature_retrieval(teacher, val_f.to(device), t2i))
        log_ = train_teacher(teacher, tp, seed, train_feats=train_f, device=device, progress=progress)
        times["train"] = log_.seconds
        metrics["val"] = _rounded(feature_retrieval(teacher, val_f.to(device), t2i))
        keys = trained_keys(teacher, 0)
    else:
        if len(train_sets) > 1:
            raise ValueError(f"{role}: tune_last_blocks > 0 trains on one split only, got splits {splits}")
        t0 = time.perf_counter()
        img, txt = encode_split(teacher, val_ds, fbs, device, progress, "val (random heads)")
        metrics["val_random_heads"] = _rounded(retrieval_metrics(img, txt, t2i))
        times["eval"] = time.perf_counter() - t0
        log_ = train_teacher(teacher, tp, seed, train_ds=train_ds, device=device, progress=progress)
        times["train"] = log_.seconds
        t0 = time.perf_counter()
        img, txt = encode_split(teacher, val_ds, fbs, device, progress, "val")
        metrics["val"] = _rounded(retrieval_metrics(img, txt, t2i))
        times["eval"] += time.perf_counter() - t0
        keys = trained_keys(teacher, tp.tune_last_blocks)
    if log_ is not None:
        metrics.update({"train_steps": log_.steps, "train_loss_first_epoch": _rounded(log_.first),
                        "train_loss_last_epoch": _rounded(log_.last), "logit_scale": round(log_.logit_scale, 4)})

    teacher = teacher.to("cpu")
    identity = teacher.identity()
    doc = {
        "format": SPEC_FORMAT,
        "setting": params.setting,
        "encoder_spec": to_dict(spec),
        "identity": identity,
        "weights_file": WEIGHTS_FILE if trains else None,
        "keys": keys,
        "training": {"seed": seed, **to_dict(tp)} if trains else None,
        "role": role,
        "data": {"root": str(data_root), "digest": info["digest"], "splits": splits,
                 "train_images": sum(len(ds) for ds in train_sets),
                 "train_captions": sum(len(ds.flat_captions()) for ds in train_sets), "val_images": len(val_ds),
                 "val_captions": len(t2i)},
        "metrics": {k: v for k, v in metrics.items() if k != "time_s"},
    }
    with atomic_dir(out_dir) as tmp:
        if trains:
            save_weights(head_state(teacher, keys), tmp / WEIGHTS_FILE,
                         metadata={"format": SPEC_FORMAT, "encoder": teacher.name,
                                   "weights_sha256": identity["weights_sha256"]})
        (tmp / SPEC_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    times["total"] = time.perf_counter() - t_start
    metrics["time_s"] = _rounded(times, 2)
    if metrics_path:
        atomic_write_bytes(Path(metrics_path), (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())
    return metrics


__all__ = [
    "Features",
    "LOGIT_SCALE_MAX",
    "SPEC_FILE",
    "SPEC_FORMAT",
    "TeacherError",
    "TrainLog",
    "WEIGHTS_FILE",
    "caption_choice",
    "clip_infonce",
    "embed_batch",
    "embed_features",
    "encode_split",
    "extract_features",
    "feature_retrieval",
    "head_state",
    "load_heads",
    "load_teacher",
    "read_spec",
    "reset_heads",
    "retrieval_metrics",
    "run_teacher_stage",
    "save_weights",
    "teacher_objective",
    "train_teacher",
    "trained_keys",
    "tuned_blocks",
]
