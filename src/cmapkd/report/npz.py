"""Reading the evaluate stage's .npz arrays (figure arrays, per-query ranks) for the report stages."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def read_npz(path: str | Path, keys: Sequence[str], error: type[Exception], what: str) -> dict[str, np.ndarray]:
    """The arrays `keys` of the .npz at `path`, read without pickle. Raises `error` with a message
    that names the file and the problem: not found (`what` says what the file is and which stage
    writes it), not a readable .npz, missing keys, or an object array (which would need pickle)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise error(f"{path}: missing key(s) {', '.join(missing)}")
            arrays = {}
            for k in keys:
                try:
                    arrays[k] = np.asarray(z[k])
                except ValueError as e:  # object arrays need pickle: refuse them
                    raise error(f"{path}: key '{k}' cannot be read without pickle ({e}); save strings as str arrays") from e
    except (OSError, ValueError) as e:
        if isinstance(e, error):
            raise
        raise error(f"{path}: not a readable .npz file ({e})") from e
    return arrays
