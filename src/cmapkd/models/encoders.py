"""Dual encoders (an image tower + a text tower + a logit scale) and their builder from params.

`build_encoder(spec)` is the one factory for the teacher and the student of both settings:
- kind `open_clip`: `open_clip.create_model(name, pretrained=tag|path|None)`; the names of the
  JSON configs in `src/cmapkd/model_configs/` are registered with `open_clip.add_model_config`;
  a config may name a Hugging Face tokenizer (`text_cfg.hf_tokenizer_name`, "package:<module>"
  resolves to an installed weights package) instead of open_clip's BPE;
- kind `towers`: a timm CNN + a Hugging Face text encoder with projection heads (the embedded
  teacher: EfficientNet-Lite2 + all-MiniLM-L6-v2).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmapkd.models.towers import (
    HFTextTokenizer,
    HFTextTower,
    ImageTower,
    OpenCLIPImageTower,
    OpenCLIPTextTower,
    OpenCLIPTokenizer,
    TextTower,
    TimmImageTower,
    package_path,
)

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"
_REGISTERED = False


def register_model_configs() -> None:
    """Make the JSON architectures in src/cmapkd/model_configs known to open_clip (once)."""
    global _REGISTERED
    if not _REGISTERED:
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _REGISTERED = True


class DualEncoder(nn.Module):
    """A CLIP-like model seen through the tower adapters."""

    image: ImageTower
    text: TextTower

    def __init__(self, image: ImageTower, text: TextTower, logit_scale: nn.Parameter | None = None,
                 clip: nn.Module | None = None, name: str = ""):
        super().__init__()
        if clip is not None:
            self.clip = clip  # registered first: owns the parameters the open_clip towers use
        self.image = image
        self.text = text
        if logit_scale is None and clip is None:
            logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if clip is None:
            self._logit_scale = logit_scale
        self.name = name

    @property
    def logit_scale(self) -> nn.Parameter:
        """log of the contrastive logit scale (CLIP convention: use `.exp()`)."""
        return self.clip.logit_scale if hasattr(self, "clip") else self._logit_scale

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        return self.text.tokenize(texts)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """[0, 1] / uint8 pixels `[B, 3, H, W]` (any size) -> final image embeddings."""
        e = self.image(self.image.prepare(images)).embedding
        return F.normalize(e, dim=-1) if normalize else e

    def encode_text(self, ids: Tensor, mask: Tensor, normalize: bool = True) -> Tensor:
        e = self.text(ids, mask).embedding
        return F.normalize(e, dim=-1) if normalize else e

    def identity(self) -> dict:
        """What a teacher cache must match (METHOD.md 6): architecture, taps, preprocessing,
        tokenizer and a SHA-256 of every weight (state-dict order, raw bytes)."""
        h = hashlib.sha256()
        for k, v in self.state_dict().items():
            t = v.detach().to("cpu").contiguous().reshape(-1)
            h.update(k.encode())
            h.update(str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        img, txt = self.image, self.text
        return {
            "name": self.name,
            "image": {"size": img.image_size, "mean": list(img.mean), "std": list(img.std), "taps": list(img.taps),
                      "level_channels": list(img.level_channels)},
            "text": {"taps": list(txt.taps), "context_length": txt.context_length, "tokenizer": txt.tokenizer_identity,
                     "level_dims": list(txt.level_dims)},
            "embed_dim": img.embed_dim,
            "weights_sha256": h.hexdigest(),
        }

    def train(self, mode: bool = True):
        """Modules fixed by `set_trainable_blocks` (and frozen BatchNorm) stay in eval mode."""
        super().train(mode)
        for m in getattr(self, "_fixed_modules", []):
            m.eval()
        return self

    def last_blocks(self, n: int, n_text: int | None = None) -> list[nn.Module]:
        """The last `n` blocks of the image backbone and the last `n_text` (default `n`) layers of the
        text encoder (towers kind): EfficientNet's last MBConv blocks plus its conv_head/bn2 (which
        make the pooled final features; included when n > 0), the text encoder's last layers."""
        n_text = n if n_text is None else n_text
        if n <= 0 and n_text <= 0:
            return []
        bb = getattr(self.image, "backbone", None)
        enc = getattr(self.text, "encoder", None)
        if bb is None or enc is None or not hasattr(bb, "blocks"):
            raise ValueError(f"{self.name}: training only the last blocks needs the towers kind (a timm CNN and a HF text encoder)")
        blocks = [b for stage in bb.blocks for b in stage]
        layers = list(enc.encoder.layer)
        if n > len(blocks) or n_text > len(layers):
            raise ValueError(f"{self.name}: {n} image / {n_text} text blocks > the backbones' depth "
                             f"({len(blocks)} image blocks, {len(layers)} text layers)")
        out: list[nn.Module] = []
        if n > 0:
            out += blocks[-n:]
            out += [m for m in (getattr(bb, "conv_head", None), getattr(bb, "bn2", None)) if isinstance(m, nn.Module)]
        return out + (layers[-n_text:] if n_text > 0 else [])

    def set_trainable_blocks(self, blocks: int | list[int], freeze_bn: bool = False) -> "DualEncoder":
        """For a towers student: `blocks` = [image, text] (or one int for both); a tower's n >= 0 fixes
        every weight of its backbone except its last n blocks (`last_blocks`), n = -1 leaves it
        trainable; the heads and the logit scale always train. Fixed weights get no gradient (so
        autograd does no work below the first trained block), are left out of every optimizer group
        (`Distiller.param_groups` skips them, `freeze_groups` never unfreezes them) and their modules
        stay in eval mode. `freeze_bn` keeps every BatchNorm of the image backbone in eval mode
        (pretrained statistics)."""
        n_img, n_txt = (blocks, blocks) if isinstance(blocks, int) else (int(blocks[0]), int(blocks[1]))
        fixed: list[nn.Module] = []
        towers = [(getattr(self.image, "backbone", None), n_img), (getattr(self.text, "encoder", None), n_txt)]
        if any(n >= 0 for _, n in towers):
            last = self.last_blocks(max(n_img, 0), max(n_txt, 0))
            trained = {id(p) for m in self.heads() + last for p in m.parameters()} | {id(self.logit_scale)}
            for tower, n in towers:
                if tower is None or n < 0:
                    continue
                for p in tower.parameters():
                    if id(p) not in trained:
                        p.requires_grad_(False)
                        p.cmapkd_fixed = True
                # modules with parameters and none of them trained (eval() recurses into children)
                fixed += [m for m in tower.modules()
                          if list(m.parameters()) and not any(id(p) in trained for p in m.parameters())]
        if freeze_bn and hasattr(self.image, "backbone"):
            fixed += [m for m in self.image.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._fixed_modules = fixed
        self.train(self.training)
        return self

    def heads(self) -> list[nn.Module]:
        """The projection heads a teacher stage trains on top of frozen backbones (towers kind)."""
        out: list[nn.Module] = []
        for tower in (self.image, self.text):
            for name in ("proj", "level_heads"):
                if isinstance(getattr(tower, name, None), nn.Module):
                    out.append(getattr(tower, name))
        return out


def _load_checkpoint(model: nn.Module, path: str) -> None:
    """A full state dict, or the heads only (strict on the keys present in the file)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: encoder checkpoint not found (model.*.checkpoint)")
    sd = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    own = model.state_dict()
    unknown = sorted(set(sd) - set(own))
    if unknown:
        raise ValueError(f"{p}: keys not in the encoder: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{p}: tensor '{k}' has shape {tuple(v.shape)}, the encoder expects {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=False)


def build_encoder(spec) -> DualEncoder:
    """Build a dual encoder from an `EncoderSpec` (cmapkd.config)."""
    if spec.kind == "open_clip":
        import open_clip

        register_model_configs()
        name = spec.open_clip_model
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise ValueError(f"model.open_clip_model: '{name}' is neither an open_clip architecture nor in {MODEL_CONFIG_DIR}")
        pretrained = spec.pretrained or None
        clip = open_clip.create_model(name, pretrained=pretrained, pretrained_text=False, pretrained_image=False)
        text_cfg = cfg["text_cfg"]
        ctx = int(text_cfg.get("context_length", 77))
        if ctx != spec.context_length:
            raise ValueError(f"model: context_length {spec.context_length} != {ctx} of open_clip '{name}'")
        hf_tok = text_cfg.get("hf_tokenizer_name")
        if hf_tok:
            path = package_path(hf_tok, "minilm") if hf_tok.startswith("package") else hf_tok
            tokenizer = HFTextTokenizer(path, ctx)
        else:
            tokenizer = OpenCLIPTokenizer(name, ctx)
        image = OpenCLIPImageTower(clip, spec.image_taps)
        if image.image_size != spec.image_size:
            raise ValueError(f"model: image_size {spec.image_size} != {image.image_size} of open_clip '{name}'")
        text = OpenCLIPTextTower(clip, spec.text_taps, tokenizer)
        if image.embed_dim != spec.embed_dim:
            raise ValueError(f"model: embed_dim {spec.embed_dim} != {image.embed_dim} of open_clip '{name}'")
        enc = DualEncoder(image, text, clip=clip, name=f"open_clip:{name}:{spec.pretrained or 'random'}")
    elif spec.kind == "towers":
        image = TimmImageTower(spec.image_model, spec.image_weights, spec.image_taps, spec.image_size, spec.embed_dim)
        text = HFTextTower(spec.text_model, spec.text_taps, spec.context_length, spec.embed_dim, spec.text_pool,
                           num_layers=spec.text_layers)
        enc = DualEncoder(image, text, name=f"towers:{spec.image_model}+{Path(spec.text_model).name}")
    else:
        raise ValueError(f"model: unknown encoder kind '{spec.kind}'")
    if spec.checkpoint:
        _load_checkpoint(enc, spec.checkpoint)
    return enc


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients (the teacher during distillation)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


__all__ = ["DualEncoder", "MODEL_CONFIG_DIR", "build_encoder", "freeze", "register_model_configs"]
