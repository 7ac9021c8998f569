"""EmojiScenes: seeded multi-object scenes of Noto emoji, with captions and template VQA.

A scene is a canvas with 1..max_objects emoji on a 3x3 grid (one object per cell), each small,
medium or large, on a solid, gradient or lightly textured background. Scene types:
    simple        one large object (not a symbol or flag)
    complex       3..max_objects small/medium objects (not symbols or flags)
    fine-grained  1..max_objects small objects (not symbols or flags)
    abstract      1..3 symbols or flags
Identical emoji in a scene share a size class, so captions can count them ("two small cats").
Every caption and VQA answer is derived from the annotation only; the tests parse them back.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from cmapkd.data.emoji import ABSTRACT_GROUPS, Emoji, GlyphRenderer

SCENE_TYPES = ("simple", "complex", "fine-grained", "abstract")
SIZES = ("small", "medium", "large")

# background palette: name -> RGB (names appear in captions and VQA answers)
PALETTE: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 248),
    "light gray": (212, 212, 212),
    "gray": (150, 150, 150),
    "dark gray": (70, 70, 70),
    "beige": (236, 226, 200),
    "light blue": (173, 216, 230),
    "sky blue": (120, 190, 235),
    "dark blue": (35, 55, 115),
    "light green": (192, 232, 180),
    "green": (95, 170, 95),
    "light yellow": (255, 248, 185),
    "orange": (245, 170, 90),
    "pink": (248, 196, 210),
    "lavender": (218, 208, 245),
    "peach": (255, 214, 180),
}
COLORS = tuple(PALETTE)
BACKGROUND_KINDS = ("solid", "gradient", "noise")

# caption vocabulary
SIZE_WORDS = {"small": ("small", "tiny", "little"), "medium": ("medium-sized", "mid-sized"), "large": ("large", "big", "huge")}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_VERT = {0: ("top", "upper"), 1: ("middle",), 2: ("bottom", "lower")}
_HORZ = {0: ("left",), 1: ("center", "middle"), 2: ("right",)}
POSITION_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}

# VQA categories: plural noun -> predicate over (group, subgroup)
CATEGORIES = {
    "animals": lambda g, s: s.startswith("animal-"),
    "plants": lambda g, s: s.startswith("plant-"),
    "faces": lambda g, s: s.startswith("face-"),
    "hearts": lambda g, s: s == "heart",
    "people": lambda g, s: s.startswith("person") or s == "family",
    "food or drink items": lambda g, s: g == "Food & Drink",
    "vehicles": lambda g, s: s.startswith("transport-"),
    "flags": lambda g, s: g == "Flags",
    "symbols": lambda g, s: g == "Symbols",
}

GENERATOR_VERSION = "emojiscenes-1"


def stream(seed: int, *names: str | int) -> np.random.Generator:
    """An independent, named random stream (stable across runs and machines: CRC32, not hash())."""
    keys = [int(seed) % 2**32] + [zlib.crc32(str(n).encode("utf-8")) for n in names]
    return np.random.default_rng(keys)


@dataclass(frozen=True)
class SceneConfig:
    canvas: int
    max_objects: int
    px: dict[str, tuple[int, int]]  # size class -> [min, max] longest side in px


# ------------------------------------------------------------------------------------------
# scene layout
# ------------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def make_background(rng: np.random.Generator) -> dict:
    kind = _choice(rng, BACKGROUND_KINDS)
    if kind == "gradient":
        i, j = rng.choice(len(COLORS), 2, replace=False)
        return {"kind": kind, "colors": [COLORS[int(i)], COLORS[int(j)]], "direction": _choice(rng, ("horizontal", "vertical"))}
    return {"kind": kind, "colors": [_choice(rng, COLORS)]}


def paint_background(bg: dict, canvas: int, rng: np.random.Generator) -> np.ndarray:
    c0 = np.array(PALETTE[bg["colors"][0]], np.float32)
    if bg["kind"] == "gradient":
        c1 = np.array(PALETTE[bg["colors"][1]], np.float32)
        t = np.linspace(0.0, 1.0, canvas, dtype=np.float32)
        t = t[None, :, None] if bg["direction"] == "horizontal" else t[:, None, None]
        img = c0 * (1 - t) + c1 * t
        img = np.broadcast_to(img, (canvas, canvas, 3))
    else:
        img = np.broadcast_to(c0, (canvas, canvas, 3)).astype(np.float32)
        if bg["kind"] == "noise":
            noise = rng.normal(0.0, 10.0, (canvas // 4 + 1, canvas // 4 + 1, 1)).astype(np.float32)
            noise = np.repeat(np.repeat(noise, 4, 0), 4, 1)[:canvas, :canvas]
            img = img + noise + rng.normal(0.0, 4.0, (canvas, canvas, 3)).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _n_objects(rng, scene_type: str, max_objects: int) -> int:
    if scene_type == "simple":
        return 1
    if scene_type == "complex":
        return int(rng.integers(min(3, max_objects), max_objects + 1))
    if scene_type == "fine-grained":
        return int(rng.integers(1, max_objects + 1))
    return int(rng.integers(1, min(3, max_objects) + 1))


def layout_scene(rng: np.random.Generator, scene_type: str, vocab: list[Emoji], cfg: SceneConfig,
                 renderer: GlyphRenderer, single: Emoji | None = None) -> dict:
    """The annotation of one scene: objects (emoji, size, cell, box) and background.
    `single`: a one-object scene of that emoji, medium or large (the zero-shot sets)."""
    if single is not None:
        n, distinct, picks, counts = 1, 1, [single], [1]
    else:
        abstract = [e for e in vocab if e.group in ABSTRACT_GROUPS]
        concrete = [e for e in vocab if e.group not in ABSTRACT_GROUPS]
        pool = abstract if scene_type == "abstract" else concrete
        n = _n_objects(rng, scene_type, cfg.max_objects)
        # how many distinct emoji: sometimes repeat one so that captions count ("two small cats")
        distinct = int(rng.integers(1, n)) if n >= 2 and rng.random() < 0.4 else n
        picks = [pool[int(i)] for i in rng.choice(len(pool), distinct, replace=False)]
        counts = [1] * distinct
        for _ in range(n - distinct):
            counts[int(rng.integers(distinct))] += 1
    if single is not None:
        sizes = [_choice(rng, ("medium", "large"))]
    elif scene_type == "simple":
        sizes = ["large"]
    elif scene_type == "fine-grained":
        sizes = ["small"] * distinct
    elif n == 1:
        sizes = [_choice(rng, SIZES)]
    else:
        sizes = [_choice(rng, ("small", "medium")) for _ in range(distinct)]
    cells = [int(c) for c in rng.choice(9, n, replace=False)]
    W = cfg.canvas
    cell = W / 3
    objects = []
    k = 0
    for e, cnt, size in zip(picks, counts, sizes):
        for _ in range(cnt):
            r, c = divmod(cells[k], 3)
            k += 1
            lo, hi = cfg.px[size]
            s = int(rng.integers(lo, hi + 1))
            g = renderer.sized(e.char, s)
            w, h = g.size
            jx, jy = max(0, int((cell - w) / 2) - 1), max(0, int((cell - h) / 2) - 1)
            cx = (c + 0.5) * cell + int(rng.integers(-jx, jx + 1))
            cy = (r + 0.5) * cell + int(rng.integers(-jy, jy + 1))
            x0 = min(max(0, int(round(cx - w / 2))), W - w)
            y0 = min(max(0, int(round(cy - h / 2))), W - h)
            box = [x0, y0, x0 + w, y0 + h]
            row, col = int((y0 + h / 2) // cell), int((x0 + w / 2) // cell)
            assert (row, col) == (r, c), "object centre left its grid cell"
            objects.append({
                "char": e.char, "name": e.name, "group": e.group, "subgroup": e.subgroup,
                "size": size, "px": s, "row": row, "col": col, "position": POSITION_NAMES[(row, col)], "box": box,
            })
    objects.sort(key=lambda o: (o["row"], o["col"]))
    return {"scene_type": scene_type, "objects": objects, "background": make_background(rng)}


def render_scene(ann: dict, cfg: SceneConfig, renderer: GlyphRenderer, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    bg = paint_background(ann["background"], cfg.canvas, rng)
    im = Image.fromarray(bg, "RGB").convert("RGBA")
    for o in ann["objects"]:
        g = renderer.sized(o["char"], o["px"])
        im.alpha_composite(g, (o["box"][0], o["box"][1]))
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


# ------------------------------------------------------------------------------------------
# captions
# ------------------------------------------------------------------------------------------


def _article(next_word: str) -> str:
    return "an" if next_word[:1].lower() in "aeiou" else "a"


def position_phrase(row: int, col: int, rng: np.random.Generator) -> str:
    if (row, col) == (1, 1):
        return _choice(rng, ("in the center", "in the middle"))
    if row == 1:
        side = _HORZ[col][0]
        return _choice(rng, (f"on the {side}", f"on the {side} side", f"at the middle {side}"))
    v = _choice(rng, _VERT[row])
    if col == 1:
        return _choice(rng, (f"at the {v}", f"at the {v} center", f"in the {v} middle"))
    h = _HORZ[col][0]
    return _choice(rng, (f"at the {v} {h}", f"in the {v} {h}", f"in the {v} {h} corner"))


def background_phrase(bg: dict, rng: np.random.Generator) -> str:
    if bg["kind"] == "solid":
        return _choice(rng, ("", "plain ")) + bg["colors"][0]
    if bg["kind"] == "gradient":
        return f"{bg['colors'][0]} to {bg['colors'][1]} gradient"
    return _choice(rng, ("speckled ", "textured ")) + bg["colors"][0]


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def object_groups(ann: dict) -> list[dict]:
    """Objects grouped by emoji (in first-appearance order): name, plural, count, size, cells."""
    groups: dict[str, dict] = {}
    for o in ann["objects"]:
        g = groups.setdefault(o["char"], {"char": o["char"], "name": o["name"], "size": o["size"], "cells": []})
        g["cells"].append((o["row"], o["col"]))
    return list(groups.values())


def _mention(g: dict, plural: str, rng: np.random.Generator) -> str:
    n = len(g["cells"])
    words = []
    if rng.random() < 0.75:
        words.append(_choice(rng, SIZE_WORDS[g["size"]]))
    words.append(g["name"] if n == 1 else plural)
    if n == 1:
        count = "one" if rng.random() < 0.15 else _article(words[0])
    else:
        count = number_word(n)
    text = f"{count} {' '.join(words)}"
    if n == 1 and rng.random() < 0.6:
        text += " " + position_phrase(*g["cells"][0], rng)
    return text


def _join(items: list[str], rng: np.random.Generator) -> str:
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    sep = ", and " if rng.random() < 0.3 else " and "
    return ", ".join(items[:-1]) + sep + items[-1]


FRAMES = (
    "{list}.",
    "{list} on a {bg} background.",
    "An image of {list}.",
    "A picture showing {list}.",
    "There {be} {list}.",
    "A {bg} background with {list}.",
    "{total} emoji: {list}.",
    "{list}, {total} {objects} in total.",
)


def make_captions(ann: dict, plurals: dict[str, str], k: int, rng: np.random.Generator) -> list[str]:
    """`k` different captions, each true to the annotation and mentioning every object."""
    groups = object_groups(ann)
    n_total = len(ann["objects"])
    frames = [FRAMES[int(i)] for i in rng.permutation(len(FRAMES))]
    out: list[str] = []
    attempts = 0
    while len(out) < k:
        frame = frames[len(out) % len(frames)] if attempts < 4 * k else _choice(rng, FRAMES)
        attempts += 1
        order = rng.permutation(len(groups))
        items = [_mention(groups[int(i)], plurals[groups[int(i)]["char"]], rng) for i in order]
        lst = _join(items, rng)
        bg = background_phrase(ann["background"], rng)
        text = frame.format(
            list=lst, bg=bg, be="is" if items[0].split(" ", 1)[0] in ("a", "an", "one") else "are",
            total=number_word(n_total), objects="object" if n_total == 1 else "objects",
        )
        if frame.startswith("A {bg}"):
            text = _article(bg) + text[1:]
        elif "on a {bg}" in frame:
            text = text.replace(f" on a {bg} ", f" on {_article(bg)} {bg} ")
        text = text[0].upper() + text[1:]
        if text not in out or attempts > 20 * k:
            out.append(text)
    return out


# ------------------------------------------------------------------------------------------
# template VQA (VQAv2 format)
# ------------------------------------------------------------------------------------------


def _qa(question: str, answer: str, answer_type: str, question_type: str) -> dict:
    return {"question": question, "answer": answer, "answer_type": answer_type, "question_type": question_type}


def make_vqa(ann: dict, vocab: list[Emoji], k: int, rng: np.random.Generator) -> list[dict]:
    """`k` template questions with their answer (answer types cycle yes/no, number, other)."""
    objs = ann["objects"]
    groups = object_groups(ann)
    by_char = {e.char: e for e in vocab}
    present = {o["char"] for o in objs}
    singles = [g for g in groups if len(g["cells"]) == 1]
    cell_obj = {(o["row"], o["col"]): o for o in objs}

    def cat_count(cat: str) -> int:
        return sum(CATEGORIES[cat](o["group"], o["subgroup"]) for o in objs)

    def yes_no() -> dict:
        want = "yes" if rng.random() < 0.5 else "no"  # balanced yes/no answers
        kind = int(rng.integers(4))
        if kind == 1 and singles:
            g = _choice(rng, singles)
            asked = g["size"] if want == "yes" else _choice(rng, [s for s in SIZES if s != g["size"]])
            return _qa(f"is the {g['name']} {asked}?", "yes" if asked == g["size"] else "no", "yes/no", "is the")
        if kind == 2 and singles:
            g = _choice(rng, singles)
            cell = g["cells"][0] if want == "yes" else _choice(rng, [c for c in POSITION_NAMES if c != g["cells"][0]])
            ans = "yes" if cell == g["cells"][0] else "no"
            return _qa(f"is there {_article(g['name'])} {g['name']} at the {POSITION_NAMES[cell]}?", ans, "yes/no", "is there a")
        if kind == 3:
            cats = [c for c in CATEGORIES if (cat_count(c) > 0) == (want == "yes")]
            if cats:
                cat = _choice(rng, cats)
                return _qa(f"are there any {cat}?", "yes" if cat_count(cat) else "no", "yes/no", "are there any")
        if want == "yes":
            e = by_char[_choice(rng, [o["char"] for o in objs])]
        else:
            e = _choice(rng, [e for e in vocab if e.char not in present])
        return _qa(f"is there {_article(e.name)} {e.name}?", "yes" if e.char in present else "no", "yes/no", "is there a")

    def number() -> dict:
        kind = int(rng.integers(4))
        if kind == 1:
            q = _choice(rng, ("how many objects are there?", "how many emoji are in the image?"))
            return _qa(q, str(len(objs)), "number", "how many")
        if kind == 2:  # mostly a category that is there, sometimes one that is not (answer 0)
            there = [c for c in CATEGORIES if cat_count(c) > 0]
            cat = _choice(rng, there) if there and rng.random() < 0.75 else _choice(rng, list(CATEGORIES))
            return _qa(f"how many {cat} are there?", str(cat_count(cat)), "number", "how many")
        if kind == 3:
            size = _choice(rng, sorted({o["size"] for o in objs})) if rng.random() < 0.75 else _choice(rng, SIZES)
            return _qa(f"how many {size} objects are there?", str(sum(o["size"] == size for o in objs)), "number", "how many")
        if rng.random() < 0.85:
            g = _choice(rng, groups)
            e, n = by_char[g["char"]], len(g["cells"])
        else:
            e, n = _choice(rng, [e for e in vocab if e.char not in present]), 0
        return _qa(f"how many {e.plural} are there?", str(n), "number", "how many")

    def other() -> dict:
        kind = int(rng.integers(4))
        if kind == 1 and singles:
            g = _choice(rng, singles)
            return _qa(f"what size is the {g['name']}?", g["size"], "other", "what size is the")
        if kind == 2 and singles:
            g = _choice(rng, singles)
            return _qa(f"where is the {g['name']}?", POSITION_NAMES[g["cells"][0]], "other", "where is the")
        if kind == 3 and ann["background"]["kind"] == "solid":
            return _qa("what color is the background?", ann["background"]["colors"][0], "other", "what color is the")
        cell = _choice(rng, sorted(cell_obj))
        return _qa(f"what is at the {POSITION_NAMES[cell]}?", cell_obj[cell]["name"].lower(), "other", "what is")

    makers = (yes_no, number, other)
    out, seen = [], set()
    for i in range(k):
        for _ in range(10):  # avoid asking the same question twice about one image
            qa = makers[i % 3]()
            if qa["question"] not in seen:
                break
        seen.add(qa["question"])
        out.append(qa)
    return out
