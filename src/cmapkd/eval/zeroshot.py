"""Zero-shot classification, CLIP_benchmark protocol (ANCHORS.md section 4.2).

Class weights: for each class, embed every template filled with the class name, L2-normalise each
embedding, average, and re-normalise. An image is classified by cosine similarity between its
L2-normalised embedding and the class weights (CLIP_benchmark multiplies by 100 first, which
changes no ranking). Reported: top-1, top-5 (k clipped to the number of classes) and the mean
per-class recall of the top-1 predictions (CLIP_benchmark's `mean_per_class_recall`, i.e.
sklearn's balanced accuracy: the mean over classes that have test images), all as fractions.

This is `open_clip.build_zero_shot_classifier` re-implemented on an `encode_text(list[str])`
callable (open_clip's version needs a model and a tokenizer); the output layout is the same,
weights `[dim, n_classes]`. Ties between class scores follow the retrieval rule: higher score
first, then lower class index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cmapkd.eval.retrieval import as_index_tensor, as_unit_embeddings, best_positive_rank

Template = str | Callable[[str], str]


def fill_template(template: Template, classname: str) -> str:
    """A template is a callable (open_clip style) or a string with `{}` or `{c}` (CLIP_benchmark)."""
    return template(classname) if callable(template) else template.format(classname, c=classname)


@torch.no_grad()
def build_zeroshot_weights(
    encode_text: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
    classes_per_batch: int = 10,
) -> torch.Tensor:
    """Zero-shot class weights `[dim, n_classes]` (float32, CPU): per class, the mean of the
    L2-normalised template embeddings, re-normalised. `encode_text` maps a list of strings to
    embeddings `[n, dim]`; it is called on `classes_per_batch` classes' templates at a time."""
    if not classnames or not templates:
        raise ValueError(f"need at least one class name and one template, got {len(classnames)} and {len(templates)}")
    columns = []
    for s in range(0, len(classnames), classes_per_batch):
        batch = classnames[s : s + classes_per_batch]
        texts = [fill_template(t, c) for c in batch for t in templates]
        emb = torch.as_tensor(encode_text(texts)).detach().to("cpu", torch.float32)
        if emb.shape[0] != len(texts):
            raise ValueError(f"encode_text returned {emb.shape[0]} rows for {len(texts)} texts")
        emb = F.normalize(emb, dim=-1).reshape(len(batch), len(templates), -1).mean(dim=1)
        columns.append(F.normalize(emb, dim=-1).T)
    return torch.cat(columns, dim=1)


@dataclass(frozen=True)
class ZeroShotResult:
    """Zero-shot scores as fractions, plus arrays for figures."""

    top1: float
    top5: float  # top-min(5, n_classes)
    mean_per_class_recall: float
    per_class_recall: np.ndarray  # [n_classes]; NaN for a class with no test image
    confusion: np.ndarray  # [n_classes, n_classes] int64 counts; row = true class, column = top-1 prediction
    predictions: np.ndarray  # [n_images] top-1 class index

    def metrics(self, prefix: str = "zeroshot") -> dict[str, float]:
        return {f"{prefix}_top1": self.top1, f"{prefix}_top5": self.top5,
                f"{prefix}_mean_per_class_recall": self.mean_per_class_recall}


def zeroshot_classify(image_emb, weights, labels: Sequence[int]) -> ZeroShotResult:
    """Classify image embeddings `[n, dim]` with class weights `[dim, n_classes]` against integer
    labels; scores are computed on CPU in float64."""
    img = as_unit_embeddings(image_emb, "image_emb", torch.float64)
    w = torch.as_tensor(weights).detach().to("cpu", torch.float64)
    if w.ndim != 2 or w.shape[0] != img.shape[1]:
        raise ValueError(f"weights must be [dim={img.shape[1]}, n_classes], got shape {tuple(w.shape)}")
    n_classes = w.shape[1]
    y = as_index_tensor(labels)
    if y.numel() != img.shape[0]:
        raise ValueError(f"labels has {y.numel()} entries but image_emb has {img.shape[0]} rows")
    if ((y < 0) | (y >= n_classes)).any():
        j = int(((y < 0) | (y >= n_classes)).nonzero()[0])
        raise ValueError(f"labels[{j}] = {int(y[j])} is not a class index in [0, {n_classes})")

    scores = img @ w  # [n, n_classes]
    positive = F.one_hot(y, n_classes).bool()
    rank = best_positive_rank(scores, positive)
    # top-1 prediction under the same tie rule (argmax returns the first maximum)
    pred = scores.argmax(dim=1)

    y_np, pred_np = y.numpy(), pred.numpy()
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y_np, pred_np), 1)
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(confusion) / support, np.nan)
    return ZeroShotResult(
        top1=float((rank < 1).double().mean()),
        top5=float((rank < min(5, n_classes)).double().mean()),
        mean_per_class_recall=float(np.nanmean(per_class)),
        per_class_recall=per_class,
        confusion=confusion,
        predictions=pred_np,
    )
