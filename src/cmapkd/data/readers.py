"""Readers for processed data (the API every later stage uses).

    ImageTextDataset(root, split)   images + captions + manifest rows of one split
    ZeroShotSet(root, name)         images, labels, classnames, templates
    load_vqa(root, split)           (questions_json, annotations_json) in the VQAv2 format
    read_info(root)                 info.json (with `digest`, the data identity)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cmapkd.data.store import INFO_FILE, read_jsonl


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path}: {what} not found (run `dvc repro prepare` first)")


class ShardedImages:
    """Read-only accessor over the memory-mapped uint8 shards of one split: behaves like an
    array of shape [n, H, W, 3] for integer, slice and integer-array indexing."""

    def __init__(self, root: Path, rows: list[dict]):
        self.root = Path(root)
        names = sorted({r["shard"] for r in rows})
        self._shards = {n: np.load(self.root / n, mmap_mode="r") for n in names}
        self._loc = [(r["shard"], r["offset"]) for r in rows]
        if names:
            h, w, c = self._shards[names[0]].shape[1:]
        else:
            h = w = c = 0
        self.shape = (len(rows), h, w, c)
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def _one(self, i: int) -> np.ndarray:
        shard, off = self._loc[i]
        return self._shards[shard][off]

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            i = int(idx)
            if i < 0:
                i += len(self)
            if not 0 <= i < len(self):
                raise IndexError(f"image index {idx} out of range for {len(self)} images")
            return self._one(i)
        if isinstance(idx, slice):
            idx = range(*idx.indices(len(self)))
        idx = list(np.asarray(list(idx)).reshape(-1))
        if not idx:
            return np.zeros((0, *self.shape[1:]), np.uint8)
        return np.stack([self[int(i)] for i in idx])

    def __array__(self, dtype=None, copy=None):
        arr = self[:]
        return arr.astype(dtype) if dtype is not None else arr


class ImageTextDataset(Dataset):
    """One split of a processed image-text dataset (a torch-style Dataset).

    `ds[i]` -> {"image": uint8 tensor [3, H, W], "captions": list[str], "index": i}.
    Attributes: `images` (ShardedImages, [n, H, W, 3]), `captions` (list of lists),
    `manifest` (the manifest rows), `text_to_image()` (flattened caption j -> image index)."""

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        self.split = split
        path = self.root / f"manifest-{split}.jsonl"
        if not path.is_file():
            raise _missing(path, f"manifest of split '{split}'")
        self.manifest: list[dict] = read_jsonl(path)
        for i, row in enumerate(self.manifest):
            if row["index"] != i:
                raise ValueError(f"{path}: row {i} has index {row['index']} (the row order is broken)")
        self.captions: list[list[str]] = [list(r["captions"]) for r in self.manifest]
        self.images = ShardedImages(self.root, self.manifest)

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, i: int) -> dict:
        img = torch.from_numpy(np.array(self.images[i], copy=True)).permute(2, 0, 1).contiguous()
        return {"image": img, "captions": self.captions[i], "index": int(i)}

    def text_to_image(self) -> list[int]:
        return [i for i, caps in enumerate(self.captions) for _ in caps]

    def flat_captions(self) -> list[str]:
        return [c for caps in self.captions for c in caps]


class ZeroShotSet(Dataset):
    """A zero-shot classification set: `images` uint8 [n, H, W, 3] (memmap), `labels` int64 [n],
    `classnames` list[str], `templates` list[str] (each with one '{}')."""

    def __init__(self, root: str | Path, name: str):
        self.root = Path(root) / "zeroshot" / name
        self.name = name
        meta = self.root / "classes.json"
        if not meta.is_file():
            raise _missing(meta, f"zero-shot set '{name}'")
        info = json.loads(meta.read_text(encoding="utf-8"))
        self.classnames: list[str] = info["classnames"]
        self.templates: list[str] = info["templates"]
        self.images = np.load(self.root / "images.npy", mmap_mode="r")
        self.labels = np.load(self.root / "labels.npy")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        img = torch.from_numpy(np.array(self.images[i], copy=True)).permute(2, 0, 1).contiguous()
        return {"image": img, "label": int(self.labels[i]), "index": int(i)}


def zeroshot_names(root: str | Path) -> list[str]:
    d = Path(root) / "zeroshot"
    return sorted(p.name for p in d.iterdir() if (p / "classes.json").is_file()) if d.is_dir() else []


def load_vqa(root: str | Path, split: str) -> tuple[dict, dict]:
    """(questions, annotations) of a split, as VQAv2 JSON objects. `image_id` is the manifest's."""
    q = Path(root) / "vqa" / f"questions-{split}.json"
    a = Path(root) / "vqa" / f"annotations-{split}.json"
    if not q.is_file() or not a.is_file():
        raise _missing(q if not q.is_file() else a, f"VQA files of split '{split}'")
    return json.loads(q.read_text(encoding="utf-8")), json.loads(a.read_text(encoding="utf-8"))


def read_info(root: str | Path) -> dict:
    path = Path(root) / INFO_FILE
    if not path.is_file():
        raise _missing(path, "info.json")
    return json.loads(path.read_text(encoding="utf-8"))
