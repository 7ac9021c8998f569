"""Baseline methods as distillers for the shared training loop. Each differs only in its losses.

- `ScratchStudent`: the student with the task loss only (open_clip ClipLoss), no teacher.
"""

from __future__ import annotations

from typing import Mapping

import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor

from cmapkd.distill.base import Distiller
from cmapkd.models.encoders import DualEncoder

LOGIT_SCALE_MAX = 4.6052  # ln(100), open_clip's clamp


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


__all__ = ["ScratchStudent"]
