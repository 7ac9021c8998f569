"""Teacher-target cache (METHOD.md section 6): fp16 safetensors shards plus an identity record.

Layout of a cache folder:
    identity.json                  what the targets belong to (teacher, taps, preprocessing, data, views)
    image-v{K}-{S}.safetensors     image-side targets of view K for rows [S*shard_rows, ...) of the split
    text-{S}.safetensors           text-side targets, one row per caption in flattened caption order

A reader checks the identity it is given against `identity.json` and refuses a mismatch with an
error that names every differing field: a cache is never silently reused for another teacher,
other taps, other preprocessing, other data or other views.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

IDENTITY_FILE = "identity.json"


class CacheMismatchError(RuntimeError):
    """The teacher cache on disk was made for another teacher, data or view set."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def compare_identity(expected: dict, found: dict) -> list[str]:
    """Human-readable differences between two identity records (empty when they match)."""
    # a JSON round trip makes tuples and lists compare equal, as they will after a save
    e = _flatten(json.loads(json.dumps(expected)))
    f = _flatten(json.loads(json.dumps(found)))
    diffs = []
    for key in sorted(set(e) | set(f)):
        if e.get(key, "<absent>") != f.get(key, "<absent>"):
            diffs.append(f"{key}: cache has {f.get(key, '<absent>')!r}, expected {e.get(key, '<absent>')!r}")
    return diffs


class ShardWriter:
    """Accumulates row blocks of named tensors and writes fp16 safetensors shards of `shard_rows` rows."""

    def __init__(self, folder: Path, prefix: str, shard_rows: int):
        self.folder, self.prefix, self.shard_rows = Path(folder), prefix, shard_rows
        self.buffer: dict[str, list[torch.Tensor]] = {}
        self.buffered = 0
        self.shard = 0
        self.rows = 0
        self.bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        n = {len(v) for v in tensors.values()}
        if len(n) != 1:
            raise ValueError(f"{self.prefix}: tensors of one block must have the same number of rows, got {n}")
        for k, v in tensors.items():
            self.buffer.setdefault(k, []).append(v.detach().to("cpu", torch.float16))
        self.buffered += n.pop()
        while self.buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        if rows == 0:
            return
        block = {k: torch.cat(v) for k, v in self.buffer.items()}
        out = {k: v[:rows].contiguous() for k, v in block.items()}
        rest = {k: [v[rows:]] for k, v in block.items()}
        path = self.folder / f"{self.prefix}-{self.shard:04d}.safetensors"
        save_file(out, str(path))
        self.bytes += path.stat().st_size
        self.shard += 1
        self.rows += rows
        self.buffer = rest
        self.buffered -= rows

    def close(self) -> int:
        self._flush(self.buffered)
        return self.rows


class CacheWriter:
    """Writes a cache into `folder.tmp` and renames it into place on `commit()` (never half-written)."""

    def __init__(self, folder: Path, identity: dict, shard_rows: int = 4096):
        self.final = Path(folder)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.identity = identity
        self.shard_rows = shard_rows
        self.writers: dict[str, ShardWriter] = {}

    def writer(self, prefix: str) -> ShardWriter:
        if prefix not in self.writers:
            self.writers[prefix] = ShardWriter(self.tmp, prefix, self.shard_rows)
        return self.writers[prefix]

    def commit(self, extra: dict | None = None) -> dict:
        rows = {p: w.close() for p, w in self.writers.items()}
        total_bytes = sum(w.bytes for w in self.writers.values())
        record = {"identity": self.identity, "rows": rows, "bytes": total_bytes, "shard_rows": self.shard_rows}
        record.update(extra or {})
        (self.tmp / IDENTITY_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return record


class CacheReader:
    """Loads the targets of a cache after checking its identity. Everything is read into memory
    (the embedded default's cache is tens of MB); `rows()` gathers arbitrary rows."""

    def __init__(self, folder: Path, expected_identity: dict):
        self.folder = Path(folder)
        meta_path = self.folder / IDENTITY_FILE
        if not meta_path.is_file():
            raise CacheMismatchError(f"{self.folder}: no teacher cache here ({IDENTITY_FILE} missing); run the cache_teacher stage")
        self.meta = json.loads(meta_path.read_text())
        diffs = compare_identity(expected_identity, self.meta["identity"])
        if diffs:
            raise CacheMismatchError(
                f"{meta_path}: the teacher cache does not match this run ({len(diffs)} difference(s)); "
                "re-run `dvc repro cache_teacher`:\n  " + "\n  ".join(diffs)
            )
        self._data: dict[str, dict[str, torch.Tensor]] = {}

    def _load(self, prefix: str) -> dict[str, torch.Tensor]:
        if prefix not in self._data:
            files = sorted(self.folder.glob(f"{prefix}-*.safetensors"))
            if not files:
                raise CacheMismatchError(f"{self.folder}: no shards '{prefix}-*.safetensors' in the teacher cache")
            parts: dict[str, list[torch.Tensor]] = {}
            for f in files:
                with safe_open(str(f), framework="pt") as fh:
                    for k in fh.keys():
                        parts.setdefault(k, []).append(fh.get_tensor(k))
            self._data[prefix] = {k: torch.cat(v) for k, v in parts.items()}
            expected_rows = self.meta["rows"].get(prefix)
            got = len(next(iter(self._data[prefix].values())))
            if expected_rows is not None and got != expected_rows:
                raise CacheMismatchError(f"{self.folder}: '{prefix}' has {got} rows, identity.json says {expected_rows}")
        return self._data[prefix]

    def rows(self, prefix: str, index: Iterable[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        data = self._load(prefix)
        idx = torch.as_tensor(list(index) if not isinstance(index, torch.Tensor) else index, dtype=torch.long)
        return {k: v.index_select(0, idx).float() for k, v in data.items()}

    def num_rows(self, prefix: str) -> int:
        return len(next(iter(self._load(prefix).values())))
