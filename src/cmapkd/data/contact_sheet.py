"""A contact sheet of processed scenes with their first caption (reports/contact_sheet.png)."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np

from cmapkd.data.readers import ImageTextDataset
from cmapkd.data.store import atomic_write_bytes

FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
)


def _font(size: int):
    from PIL import ImageFont

    for c in FONT_CANDIDATES:
        if Path(c).is_file():
            return ImageFont.truetype(c, size)
    return ImageFont.load_default(size=size)


def pick_rows(ds: ImageTextDataset, n: int) -> list[int]:
    """n rows, round-robin over scene types when the manifest has them (else the first n)."""
    types = [r.get("scene_type") for r in ds.manifest]
    if not any(types):
        return list(range(min(n, len(ds))))
    order = list(dict.fromkeys(t for t in types))
    queues = {t: [i for i, x in enumerate(types) if x == t] for t in order}
    out: list[int] = []
    while len(out) < min(n, len(ds)):
        for t in order:
            if queues[t] and len(out) < n:
                out.append(queues[t].pop(0))
    return out


def make_contact_sheet(root: str | Path, out_png: str | Path, n: int = 12, split: str = "test",
                       cols: int = 4, cell: int = 256, title: str | None = None) -> list[int]:
    """Draw `n` images of `split` with scene type and first caption; returns the rows shown."""
    from PIL import Image, ImageDraw

    ds = ImageTextDataset(root, split)
    rows = pick_rows(ds, n)
    font, small, big = _font(15), _font(13), _font(18)
    chars = max(20, int(cell / 8.2))
    lines_per = 5
    text_h = 20 + lines_per * 18
    pad = 12
    ncols = min(cols, max(1, len(rows)))
    nrows = (len(rows) + ncols - 1) // ncols
    head = 40
    W = ncols * (cell + pad) + pad
    H = head + nrows * (cell + text_h + pad) + pad
    sheet = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 10), title or f"{Path(root).name} / {split}: first caption of each image", fill=(0, 0, 0), font=big)
    for k, i in enumerate(rows):
        r, c = divmod(k, ncols)
        x = pad + c * (cell + pad)
        y = head + r * (cell + text_h + pad)
        img = Image.fromarray(np.asarray(ds.images[i]), "RGB")
        resample = Image.Resampling.NEAREST if cell % img.width == 0 else Image.Resampling.LANCZOS
        sheet.paste(img.resize((cell, cell), resample), (x, y))
        draw.rectangle([x - 1, y - 1, x + cell, y + cell], outline=(120, 120, 120))
        row = ds.manifest[i]
        label = f"#{i}  [{row['scene_type']}]" if row.get("scene_type") else f"#{i}  {row.get('id', '')}"
        draw.text((x, y + cell + 4), label, fill=(150, 30, 30), font=small)
        lines = textwrap.wrap(ds.captions[i][0], width=chars)
        if len(lines) > lines_per:
            lines = lines[: lines_per - 1] + [lines[lines_per - 1][: chars - 3] + "..."]
        for j, line in enumerate(lines):
            draw.text((x, y + cell + 22 + 18 * j), line, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=False)
    atomic_write_bytes(Path(out_png), buf.getvalue())
    return rows
