"""Bad-input handling: every problem with a source file becomes a `DataError` naming the file.

Readers used by the real-format loaders go through `read_json` and `load_image` so that a
truncated JPEG, a missing file, invalid UTF-8 or invalid JSON gives one clear message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    """A source file is missing, unreadable or does not have the expected content.

    The message always starts with the file path and says what is wrong (and where: a key,
    a row, a byte offset)."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file; invalid UTF-8 is a DataError naming the byte offset."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"not valid UTF-8 at byte {e.start} ({e.reason})") from None


def read_json(path: str | Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def require_keys(obj: Any, keys: list[str], path: str | Path, where: str) -> None:
    """`obj` must be a mapping holding every key in `keys`; `where` names it (e.g. 'images[3]')."""
    if not isinstance(obj, dict):
        raise DataError(path, f"{where} is a {type(obj).__name__}, expected an object")
    for k in keys:
        if k not in obj:
            raise DataError(path, f"{where} missing key '{k}'")


def load_image(path: str | Path):
    """Open and fully decode an image as RGB (PIL). Missing, corrupt or truncated files raise DataError."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise DataError(path, "cannot decode image (not a recognised image format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        reason = "truncated" if "truncated" in str(e).lower() else str(e)
        raise DataError(path, f"cannot decode image ({reason})") from None


def resize_center_crop(im, size: int) -> np.ndarray:
    """CLIP-style preprocessing for storage: shortest side to `size` (bicubic), centre crop, uint8 RGB."""
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8)
