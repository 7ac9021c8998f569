"""The distiller protocol: one `Distiller(nn.Module)` per method, one training loop for all.

A distiller holds the student and its method-specific modules, and optionally a frozen teacher
(online mode; kept in eval mode by overriding `train()`, `requires_grad=False`, run under
`torch.no_grad()`). The training loop (`cmapkd.distill.trainer`) calls

- `compute_features(batch) -> dict[str, Tensor]`: batch-first tensors of the local batch
  (student features, per-sample loss parts, teacher targets); the loop gathers them across ranks;
- `compute_losses(features) -> dict[str, Tensor]`: named, already weighted loss terms plus
  `total` (their sum); keys starting with `diag/` are detached scalar diagnostics, not summed;
- `param_groups(lrs) -> list[dict]`: optimizer groups named after `group_names`.

`forward(images, text_ids, text_mask, targets=None)` is both steps in one call.

Batch keys: `images` [B, 3, H, W] uint8 or float in [0, 1] (each tower resizes and normalises
with its own `prepare`), `text_ids` [B, T] long and `text_mask` [B, T] bool (the student's
tokenizer), optional teacher targets `t_*` (rows of the teacher cache, any float dtype; see
`cmapkd.models.ucmp`), optional `teacher_text_ids` / `teacher_text_mask` when the teacher runs
online and tokenizes differently from the student.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from cmapkd.models.encoders import DualEncoder, freeze
from cmapkd.models.ucmp import compute_teacher_targets


class Distiller(nn.Module):
    """Base class; subclasses set `group_names`, `required_targets` and implement the two steps."""

    group_names: tuple[str, ...] = ("student",)
    required_targets: tuple[str, ...] = ()

    def __init__(self, student: DualEncoder, teacher: DualEncoder | None = None):
        super().__init__()
        self.student = student
        self.teacher = freeze(teacher) if teacher is not None else None
        self._frozen_groups: set[str] = set()

    # ---- parameter groups -------------------------------------------------------------------

    def group_modules(self) -> dict[str, list[nn.Module | nn.Parameter]]:
        """Which modules/parameters make up each optimizer group. Override in subclasses."""
        return {"student": [self.student]}

    def _group_params(self, name: str) -> list[tuple[str, nn.Parameter]]:
        seen, out = set(), []
        for i, m in enumerate(self.group_modules()[name]):
            items = m.named_parameters() if isinstance(m, nn.Module) else [(f"param{i}", m)]
            for n, p in items:
                # weights a towers student keeps fixed (`DualEncoder.set_trainable_blocks`) are in no group
                if id(p) not in seen and not getattr(p, "cmapkd_fixed", False):
                    seen.add(id(p))
                    out.append((n, p))
        return out

    def param_groups(self, lrs: Mapping[str, float], weight_decay: float | None = None) -> list[dict]:
        """One group per name in `group_names` (`lrs` must give each a learning rate), each split
        into a weight-decayed part and a `<name>_no_wd` part (biases, norms, logit scale, tables:
        every tensor with fewer than 2 dims), as open_clip does."""
        missing = [g for g in self.group_names if g not in lrs]
        if missing:
            raise KeyError(f"learning rates missing for parameter group(s) {missing}; groups: {list(self.group_names)}")
        groups = []
        for name in self.group_names:
            decay, no_decay = [], []
            for n, p in self._group_params(name):
                (no_decay if p.ndim < 2 or "logit_scale" in n else decay).append(p)
            g = {"name": name, "params": decay, "lr": float(lrs[name])}
            if weight_decay is not None:
                g["weight_decay"] = weight_decay
            groups.append(g)
            groups.append({"name": f"{name}_no_wd", "params": no_decay, "lr": float(lrs[name]), "weight_decay": 0.0})
        return [g for g in groups if g["params"]]

    def freeze_groups(self, names: Iterable[str], frozen: bool = True) -> None:
        """Stop (or restart) gradients for whole groups; frozen groups also stay in eval mode."""
        for name in names:
            if name not in self.group_names:
                raise KeyError(f"unknown parameter group '{name}'; groups: {list(self.group_names)}")
            for _, p in self._group_params(name):
                p.requires_grad_(not frozen)
            (self._frozen_groups.add if frozen else self._frozen_groups.discard)(name)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        for name in self._frozen_groups:
            for m in self.group_modules()[name]:
                if isinstance(m, nn.Module):
                    m.eval()
        return self

    # ---- checkpoints: the frozen teacher is not part of the trained state ----------------------

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for k in [k for k in sd if k.startswith(prefix + "teacher.")]:
            del sd[k]
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith("teacher.")]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"{type(self).__name__}.load_state_dict: missing keys {missing[:5]}, unexpected keys {result.unexpected_keys[:5]}"
            )
        return result

    # ---- teacher targets ------------------------------------------------------------------

    def student_grids(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def teacher_targets(self, images: Tensor, text_ids: Tensor, text_mask: Tensor) -> dict[str, Tensor]:
        """Run the frozen teacher online (same function as the cache stage)."""
        if self.teacher is None:
            raise RuntimeError("no teacher: pass cached targets (t_* keys) in the batch")
        self.teacher.eval()
        with torch.no_grad():
            return compute_teacher_targets(self.teacher, images, text_ids, text_mask, self.student_grids())

    def targets_from_batch(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The cached targets of the batch, or the online teacher's when the batch has none."""
        need = self.required_targets
        if need and all(k in batch for k in need):
            return {k: batch[k].float() for k in need}
        if self.teacher is None:
            missing = [k for k in need if k not in batch]
            raise KeyError(f"batch lacks teacher targets {missing} and the distiller has no online teacher")
        ids, mask = batch.get("teacher_text_ids"), batch.get("teacher_text_mask")
        if ids is None:
            if self.teacher.text.tokenizer_identity != self.student.text.tokenizer_identity:
                raise ValueError(
                    "teacher and student tokenize differently "
                    f"({self.teacher.text.tokenizer_identity} vs {self.student.text.tokenizer_identity}): "
                    "pass teacher_text_ids / teacher_text_mask in the batch"
                )
            ids, mask = batch["text_ids"], batch["text_mask"]
        return self.teacher_targets(batch["images"], ids, mask)

    # ---- the two steps ----------------------------------------------------------------------

    def compute_features(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def compute_losses(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, images: Tensor, text_ids: Tensor, text_mask: Tensor, targets: Mapping[str, Tensor] | None = None,
                teacher_text: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        batch = {"images": images, "text_ids": text_ids, "text_mask": text_mask, **(targets or {})}
        if teacher_text is not None:
            batch["teacher_text_ids"], batch["teacher_text_mask"] = teacher_text
        return self.compute_losses(self.compute_features(batch))


__all__ = ["Distiller"]
