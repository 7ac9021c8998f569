"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (idx files, parsed with numpy):
the embedded default's out-of-domain zero-shot set (real grey photos of 10 clothing classes)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from cmapkd.data.errors import DataError

ROOT_CANDIDATES = ("/usr/share/datasets/fashion-mnist",)
CLASSNAMES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES = [
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a grayscale photo of the {}.",
    "a photo of the {}.",
]
_MAGIC = {0x0801: 1, 0x0803: 3}  # unsigned byte labels (1 dim), images (3 dims)


def find_root() -> Path:
    for c in ROOT_CANDIDATES:
        if Path(c).is_dir():
            return Path(c)
    raise DataError(ROOT_CANDIDATES[0], "Fashion-MNIST folder not found; install the Debian package `dataset-fashion-mnist`")


def _open(root: Path, stem: str) -> tuple[Path, bytes]:
    for name in (stem, stem + ".gz"):
        p = root / name
        if p.is_file():
            data = p.read_bytes()
            if name.endswith(".gz"):
                try:
                    data = gzip.decompress(data)
                except (OSError, EOFError) as e:
                    raise DataError(p, f"cannot decompress ({e})") from None
            return p, data
    raise DataError(root / stem, "file not found (looked for the raw and the .gz name)")


def read_idx(root: Path, stem: str) -> np.ndarray:
    """Parse an idx file: big-endian magic (0x0801 / 0x0803 for unsigned bytes), dims, data."""
    path, data = _open(root, stem)
    if len(data) < 8:
        raise DataError(path, "truncated idx header")
    magic = int.from_bytes(data[:4], "big")
    if magic not in _MAGIC:
        raise DataError(path, f"unexpected idx magic number {magic:#x}")
    ndim = _MAGIC[magic]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    need = int(np.prod(dims))
    if len(data) - start != need:
        raise DataError(path, f"idx payload has {len(data) - start} bytes, header says {need}")
    return np.frombuffer(data, np.uint8, count=need, offset=start).reshape(dims)


def load_test_subset(n: int, size: int, rng: np.random.Generator, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced, seeded subset of the 10k test images: uint8 RGB [n, size, size, 3] and labels."""
    from PIL import Image

    root = Path(root) if root else find_root()
    images = read_idx(root, "t10k-images-idx3-ubyte")
    labels = read_idx(root, "t10k-labels-idx1-ubyte").astype(np.int64)
    if len(images) != len(labels):
        raise DataError(root, f"{len(images)} test images but {len(labels)} labels")
    per = n // len(CLASSNAMES)
    idx = []
    for c in range(len(CLASSNAMES)):
        cand = np.flatnonzero(labels == c)
        if len(cand) < per:
            raise DataError(root, f"class {c} has {len(cand)} test images, {per} requested")
        idx.append(rng.choice(cand, per, replace=False))
    idx = np.sort(np.concatenate(idx))
    out = np.empty((len(idx), size, size, 3), np.uint8)
    for k, i in enumerate(idx):
        im = Image.fromarray(images[i], "L").resize((size, size), Image.Resampling.LANCZOS)
        out[k] = np.asarray(im.convert("RGB"))
    return out, labels[idx]
