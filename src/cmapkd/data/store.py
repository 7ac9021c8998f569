"""Processed-data storage: uint8 image shards, JSONL manifests, deterministic JSON, digests.

Layout of `data/processed/<dataset>/` (docs/data.md):
    images-<split>-NNN.npy     uint8 [n, H, W, 3], at most `shard_size` images each
    manifest-<split>.jsonl     one row per image, row i = image i of the split
    vqa/questions-<split>.json, vqa/annotations-<split>.json   (VQAv2 format)
    zeroshot/<name>/images.npy, labels.npy, classes.json
    info.json                  params, counts, skipped inputs, sha256 of every file, `digest`

Everything is written into a temporary sibling folder and moved into place with `os.replace` at
the end (`atomic_dir`), so an interrupted run never leaves a complete-looking output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

SPLITS = ("train", "val", "test")
INFO_FILE = "info.json"


def dumps(obj: Any) -> str:
    """Deterministic JSON text: sorted keys, fixed separators, UTF-8 kept as is."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(obj) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)


def shard_name(split: str, k: int) -> str:
    return f"images-{split}-{k:03d}.npy"


class ShardWriter:
    """Collects uint8 [H, W, 3] images of one split and writes them as shards of `shard_size`."""

    def __init__(self, root: Path, split: str, shard_size: int, resolution: int):
        self.root, self.split, self.shard_size, self.resolution = Path(root), split, shard_size, resolution
        self._buf: list[np.ndarray] = []
        self._k = 0
        self.count = 0

    def add(self, image: np.ndarray) -> tuple[str, int]:
        """Store one image; returns (shard file name, offset in the shard)."""
        r = self.resolution
        if image.dtype != np.uint8 or image.shape != (r, r, 3):
            raise ValueError(f"shard image must be uint8 [{r}, {r}, 3], got {image.dtype} {image.shape}")
        loc = (shard_name(self.split, self._k), len(self._buf))
        self._buf.append(image)
        self.count += 1
        if len(self._buf) == self.shard_size:
            self._flush()
        return loc

    def _flush(self) -> None:
        if self._buf:
            save_npy(self.root / shard_name(self.split, self._k), np.stack(self._buf))
            self._buf = []
            self._k += 1

    def close(self) -> None:
        self._flush()
        if self.count == 0:  # an empty split still has one (empty) shard so readers find H, W
            r = self.resolution
            save_npy(self.root / shard_name(self.split, 0), np.zeros((0, r, r, 3), np.uint8))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (except info.json), keyed by its posix relative path."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != INFO_FILE:
            out[rel] = sha256_file(p)
    return out


def combined_digest(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\t{files[rel]}\n".encode())
    return h.hexdigest()


def write_info(root: Path, info: dict) -> dict:
    """Add `files` (sha256 per file) and `digest` (over all of them) to `info` and write info.json."""
    files = file_digests(root)
    info = {**info, "files": files, "digest": combined_digest(files)}
    write_json(Path(root) / INFO_FILE, info)
    return info


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `final`; on success it replaces `final` in one rename.
    On error the temporary folder is removed and `final` (if any) is left untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
