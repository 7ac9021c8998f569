"""Noto Color Emoji glyphs with names, groups and subgroups from Unicode's emoji-test.txt.

Sources (Debian packages): `fonts-noto-color-emoji` (NotoColorEmoji.ttf, CBDT bitmaps rendered by
Pillow at size 109) and `unicode-data` (emoji-test.txt). The vocabulary keeps fully-qualified emoji
without skin-tone modifiers, outside the Component group, whose name reads well in a caption and
whose render is one glyph (one advance, non-empty, not tofu).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from cmapkd.data.errors import DataError, read_text

EMOJI_TEST_CANDIDATES = (
    "/usr/share/unicode/emoji/emoji-test.txt",
    "/usr/share/unicode-data/emoji/emoji-test.txt",
)
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
)
FONT_SIZE = 109  # the only size the CBDT bitmaps come in
SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}

# emoji-test.txt group -> a readable class name (zero-shot classnames) and its order
GROUPS: dict[str, str] = {
    "Smileys & Emotion": "smileys and emotions",
    "People & Body": "people and body parts",
    "Animals & Nature": "animals and nature",
    "Food & Drink": "food and drink",
    "Travel & Places": "travel and places",
    "Activities": "activities",
    "Objects": "objects",
    "Symbols": "symbols",
    "Flags": "flags",
}
ABSTRACT_GROUPS = ("Symbols", "Flags")

# words that would make a caption ambiguous (sizes, counts, list joiners) are not allowed in names
_BANNED_WORDS = {
    "small", "large", "big", "tiny", "little", "medium", "huge", "mid-sized", "medium-sized",
    "and", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
}
_IRREGULAR = {
    "man": "men", "woman": "women", "person": "people", "child": "children", "mouse": "mice",
    "goose": "geese", "tooth": "teeth", "foot": "feet", "leaf": "leaves", "knife": "knives",
    "fish": "fish", "sheep": "sheep", "deer": "deer", "bison": "bison", "moose": "moose",
    "shrimp": "shrimp", "squid": "squid", "sushi": "sushi", "dice": "dice", "ox": "oxen",
    "cactus": "cacti", "wolf": "wolves", "shelf": "shelves", "loaf": "loaves", "elf": "elves",
    "mahjong": "mahjong", "kimono": "kimonos", "piano": "pianos", "tornado": "tornadoes",
    "volcano": "volcanoes", "potato": "potatoes", "tomato": "tomatoes", "mango": "mangoes",
    "avocado": "avocados", "flamingo": "flamingos", "kangaroo": "kangaroos",
}
_PREPOSITIONS = {"with", "of", "in", "on", "at", "for", "from", "without", "under", "over", "behind", "by"}


@dataclass(frozen=True)
class Emoji:
    char: str
    codepoints: str  # e.g. "1F408"
    name: str  # caption form, e.g. "cat", "flag of Japan"
    plural: str  # e.g. "cats", "flags of Japan"
    group: str  # emoji-test group, e.g. "Animals & Nature"
    subgroup: str  # e.g. "animal-mammal"

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("char", "codepoints", "name", "plural", "group", "subgroup")}


def find_file(candidates: tuple[str, ...], what: str, package: str) -> Path:
    for c in candidates:
        if Path(c).is_file():
            return Path(c)
    raise DataError(candidates[0], f"{what} not found; install the Debian package `{package}`")


def clean_name(raw: str) -> str | None:
    """emoji-test name -> caption name, or None when the name does not fit the caption grammar."""
    name = raw.replace("\u2019", "'").strip()
    if name.startswith("flag: "):
        name = "flag of " + name[len("flag: "):]
    name = name.replace(": ", " ").replace(":", " ")
    if any(ch in name for ch in ",\"\u201c\u201d()") or not name:
        return None
    words = name.lower().split()
    if any(w in _BANNED_WORDS for w in words):
        return None
    return " ".join(name.split())


def _plural_word(w: str) -> str:
    lw = w.lower()
    if lw in _IRREGULAR:
        p = _IRREGULAR[lw]
        return p if w.islower() else p.capitalize() if w[:1].isupper() else p
    for base, plural in _IRREGULAR.items():  # compounds: "policeman", "superwoman"
        if lw.endswith(base) and len(lw) > len(base) + 2 and base in {"man", "woman", "person", "child"}:
            return w[: len(w) - len(base)] + plural
    if lw.endswith(("ss", "x", "z", "ch", "sh")):
        return w + "es"
    if lw.endswith("s"):  # already plural: "glasses", "chopsticks"
        return w
    if lw.endswith("y") and len(lw) > 1 and lw[-2] not in "aeiou":
        return w[:-1] + "ies"
    return w + "s"


_MASS_NOUNS = {"lacrosse", "wireless", "bowling", "curling", "wrestling", "fencing"}
_PEOPLE = {"person", "man", "woman"}


def pluralize(name: str) -> str:
    """English plural of a caption name. The head noun is the word before the first preposition
    or participle ("face with tears of joy" -> "faces with tears of joy", "magnifying glass tilted
    left" -> "magnifying glasses tilted left"), else the last word; "person frowning" -> "people
    frowning". Names without a countable head get "emoji" ("two rolling on the floor laughing
    emoji"). The checker in the tests reads the stored plural, so the grammar stays verifiable."""
    words = name.split(" ")
    if len(words) > 1 and words[0].lower() in _PEOPLE and any(w.endswith("ing") for w in words[1:]):
        return " ".join([_plural_word(words[0]), *words[1:]])
    head = len(words) - 1
    for i, w in enumerate(words[1:], start=1):
        if w in _PREPOSITIONS or w.endswith("ing") or (w.endswith("ed") and len(w) > 4):
            head = i - 1
            break
    hw = words[head].lower()
    if hw.endswith("ing") or (hw.endswith("ed") and len(hw) > 4) or hw in _MASS_NOUNS:
        return name + " emoji"
    words[head] = _plural_word(words[head])
    return " ".join(words)


@dataclass(frozen=True)
class EmojiEntry:
    codepoints: str
    char: str
    raw_name: str
    group: str
    subgroup: str


def parse_emoji_test(path: str | Path) -> list[EmojiEntry]:
    """Fully-qualified emoji without skin-tone modifiers, outside the Component group, in file order."""
    text = read_text(path)
    out: list[EmojiEntry] = []
    group = subgroup = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            m = re.match(r"^([0-9A-F ]+?)\s*;\s*([a-z-]+)\s*#\s*(\S+)\s+E\d+\.\d+\s+(.+)$", line)
            if not m:
                raise DataError(path, f"line {lineno}: unexpected format: {line[:60]!r}")
            cps, status, _, name = m.groups()
            cps_list = cps.split()
            if status != "fully-qualified" or group is None or group not in GROUPS:
                continue
            if SKIN_TONES & set(cps_list):
                continue
            char = "".join(chr(int(c, 16)) for c in cps_list)
            out.append(EmojiEntry(" ".join(cps_list), char, name.strip(), group, subgroup or ""))
    if not out:
        raise DataError(path, "no fully-qualified emoji found")
    return out


class GlyphRenderer:
    """Renders emoji with Pillow from the Noto Color Emoji font; caches crops and resizes."""

    def __init__(self, font_path: str | Path | None = None):
        from PIL import ImageFont

        self.font_path = Path(font_path) if font_path else find_file(FONT_CANDIDATES, "Noto Color Emoji font", "fonts-noto-color-emoji")
        try:
            self.font = ImageFont.truetype(str(self.font_path), FONT_SIZE)
        except OSError as e:
            raise DataError(self.font_path, f"cannot load font ({e})") from None
        self._single_advance = self.font.getlength("\U0001F600")
        self._crops: dict[str, object] = {}
        self._sized: dict[tuple[str, int], object] = {}

    def render(self, char: str):
        """Cropped RGBA glyph, or None when the sequence does not render as one glyph."""
        if char in self._crops:
            return self._crops[char]
        from PIL import Image, ImageDraw

        crop = None
        adv = self.font.getlength(char)
        if 0 < adv <= self._single_advance * 1.05:
            bb = self.font.getbbox(char)
            w, h = bb[2] + 4, bb[3] + 4
            if 0 < w < 400 and 0 < h < 400:
                im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
                ImageDraw.Draw(im).text((0, 0), char, font=self.font, embedded_color=True)
                alpha_bb = im.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
                if alpha_bb is not None:
                    cw, ch = alpha_bb[2] - alpha_bb[0], alpha_bb[3] - alpha_bb[1]
                    # a real glyph fills a good part of its 136x128 cell; tofu boxes and marks do not
                    if cw >= 40 and ch >= 20 and cw <= 140 and ch <= 140:
                        crop = im.crop(alpha_bb)
                        arr = np.asarray(crop)
                        if arr[..., :3].std() < 1.0:  # monochrome box: tofu
                            crop = None
        self._crops[char] = crop
        return crop

    def sized(self, char: str, longest: int):
        """The glyph resized (LANCZOS) so that its longest side is `longest` px."""
        key = (char, longest)
        if key not in self._sized:
            from PIL import Image

            g = self.render(char)
            if g is None:
                raise ValueError(f"emoji {char!r} does not render as one glyph")
            w, h = g.size
            s = longest / max(w, h)
            nw, nh = max(1, round(w * s)), max(1, round(h * s))
            self._sized[key] = g.resize((nw, nh), Image.Resampling.LANCZOS)
        return self._sized[key]


@lru_cache(maxsize=4)
def _entries(path: str) -> tuple[EmojiEntry, ...]:
    return tuple(parse_emoji_test(path))


def build_vocab(vocab_size: int, rng: np.random.Generator, renderer: GlyphRenderer,
                emoji_test: str | Path | None = None) -> list[Emoji]:
    """`vocab_size` emoji spread evenly over the 9 groups (remainder to the first groups), drawn at
    random (seeded) among those with a usable name and a single-glyph render. Sorted by group order
    then file order, so the list is stable."""
    path = Path(emoji_test) if emoji_test else find_file(EMOJI_TEST_CANDIDATES, "emoji-test.txt", "unicode-data")
    entries = _entries(str(path))
    by_group: dict[str, list[tuple[int, EmojiEntry, str]]] = {g: [] for g in GROUPS}
    seen_names: set[str] = set()
    for i, e in enumerate(entries):
        name = clean_name(e.raw_name)
        if name is None or name.lower() in seen_names:
            continue
        seen_names.add(name.lower())
        by_group[e.group].append((i, e, name))
    groups = list(GROUPS)
    quota = {g: vocab_size // len(groups) + (1 if k < vocab_size % len(groups) else 0) for k, g in enumerate(groups)}
    chosen: list[tuple[int, Emoji]] = []
    for g in groups:
        cands = by_group[g]
        order = rng.permutation(len(cands))
        taken = 0
        for j in order:
            if taken == quota[g]:
                break
            i, e, name = cands[int(j)]
            if renderer.render(e.char) is None:
                continue
            chosen.append((i, Emoji(e.char, e.codepoints, name, pluralize(name), e.group, e.subgroup)))
            taken += 1
        if taken < quota[g]:
            raise DataError(path, f"group '{g}' has only {taken} usable emoji, {quota[g]} requested (lower prepare.emojiscenes.vocab_size)")
    chosen.sort(key=lambda t: t[0])
    return [e for _, e in chosen]


def subgroup_classname(subgroup: str) -> str:
    """Readable zero-shot class name of a subgroup: 'animal-mammal' -> 'animal mammal'."""
    return subgroup.replace("-", " ")
