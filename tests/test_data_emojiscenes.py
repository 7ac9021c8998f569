"""EmojiScenes: determinism, readers, and an independent checker that parses every caption and
recomputes every VQA answer from the scene annotation (over the whole generated set)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from data_fixtures import emoji_params

from cmapkd.config import ParamsError
from cmapkd.data import DataError, ImageTextDataset, ZeroShotSet, load_vqa, read_info
from cmapkd.data.build import build_dataset
from cmapkd.data.store import combined_digest, file_digests

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("emojiscenes")
    out = {}
    for key, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_dataset(emoji_params(seed), base / key, progress=False)
        out[key] = base / key
    return out


@pytest.fixture(scope="module")
def root(built) -> Path:
    return built["a"]


@pytest.fixture(scope="module")
def vocab(root) -> list[dict]:
    return json.loads((root / "vocab.json").read_text(encoding="utf-8"))["emoji"]


def all_files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------
# determinism and storage
# ------------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(built):
    a, b, c = (all_files(built[k]) for k in "abc")
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    assert read_info(built["a"])["digest"] == read_info(built["b"])["digest"]
    assert read_info(built["a"])["digest"] != read_info(built["c"])["digest"]
    # another seed changes the pictures and the text, not just metadata
    assert a["images-train-000.npy"] != c["images-train-000.npy"]
    assert a["manifest-test.jsonl"] != c["manifest-test.jsonl"]


def test_layout_shards_manifest_and_info(root):
    info = read_info(root)
    assert info["counts"]["splits"] == {"train": 48, "val": 16, "test": 40}
    # 48 train images in shards of 32: two shards with 32 and 16 rows
    assert np.load(root / "images-train-000.npy").shape == (32, 128, 128, 3)
    assert np.load(root / "images-train-001.npy").shape == (16, 128, 128, 3)
    assert not (root / "images-train-002.npy").exists()
    # the digest is over every file but info.json and matches what is on disk
    files = file_digests(root)
    assert info["files"] == files and info["digest"] == combined_digest(files)
    assert "info.json" not in files and "vocab.json" in files
    assert info["generator_version"] and info["params"]["emojiscenes"]["vocab_size"] == 45
    assert info["skipped"]["count"] == 0
    assert not any(p.name.startswith(".") for p in root.parent.iterdir()), "temporary folder left behind"


def test_image_text_dataset_api(root):
    ds = ImageTextDataset(root, "train")
    assert len(ds) == 48 and ds.images.shape == (48, 128, 128, 3)
    shard1 = np.load(root / "images-train-001.npy")
    item = ds[40]
    assert item["index"] == 40 and str(item["image"].dtype) == "torch.uint8"
    assert tuple(item["image"].shape) == (3, 128, 128)
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), shard1[8])
    assert np.array_equal(ds.images[[0, 40]][1], shard1[8])
    assert item["captions"] == ds.manifest[40]["captions"] and len(item["captions"]) == 5
    t2i = ds.text_to_image()
    assert len(t2i) == 48 * 5 and t2i[:6] == [0, 0, 0, 0, 0, 1] and t2i[-1] == 47
    assert [r["index"] for r in ds.manifest] == list(range(48))
    assert len({r["image_id"] for r in ds.manifest}) == 48


def test_zero_shot_sets(root, vocab):
    groups = ZeroShotSet(root, "emoji_groups")
    subs = ZeroShotSet(root, "emoji_subgroups")
    assert len(groups) == 18 and groups.images.shape == (18, 128, 128, 3)
    assert groups.classnames[:3] == ["smileys and emotions", "people and body parts", "animals and nature"]
    assert len(groups.classnames) == 9 and all("{}" in t for t in groups.templates)
    meta_g = json.loads((root / "zeroshot/emoji_groups/classes.json").read_text(encoding="utf-8"))
    meta_s = json.loads((root / "zeroshot/emoji_subgroups/classes.json").read_text(encoding="utf-8"))
    by_char = {v["char"]: v for v in vocab}
    for k, ch in enumerate(meta_g["emoji"]):
        assert meta_g["source_groups"][groups.labels[k]] == by_char[ch]["group"]
        assert meta_s["source_subgroups"][subs.labels[k]] == by_char[ch]["subgroup"]
    assert sorted(Counter(groups.labels.tolist()).values()) == [2] * 9  # balanced over the 9 groups
    fm = ZeroShotSet(root, "fashion_mnist")
    assert fm.classnames[0] == "t-shirt/top" and fm.classnames[9] == "ankle boot"
    assert sorted(Counter(fm.labels.tolist()).items()) == [(c, 2) for c in range(10)]
    img = np.asarray(fm.images[0])
    assert img.shape == (128, 128, 3) and np.array_equal(img[..., 0], img[..., 2])  # grey photo as RGB
    assert img.std() > 10  # a real picture, not an empty canvas


def test_vocab_is_real_noto_emoji_without_skin_tones_or_components(vocab):
    assert len(vocab) == 45
    assert Counter(v["group"] for v in vocab) == {g: 5 for g in (
        "Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
        "Activities", "Objects", "Symbols", "Flags")}
    for v in vocab:
        cps = v["codepoints"].split()
        assert not set(cps) & {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
        assert "".join(chr(int(c, 16)) for c in cps) == v["char"]
    assert len({v["name"].lower() for v in vocab}) == 45


def test_default_vocab_size_covers_all_groups():
    from cmapkd.data.emoji import GlyphRenderer, build_vocab
    from cmapkd.data.scenes import stream

    v = build_vocab(300, stream(0, "vocab"), GlyphRenderer())
    assert len(v) == 300 and len({e.group for e in v}) == 9 and len({e.subgroup for e in v}) > 50
    banned = {"small", "large", "big", "tiny", "little", "medium", "huge", "and", "one", "two", "three", "four"}
    assert all(e.name and e.plural and not banned & set(e.name.lower().split()) for e in v)
    assert all("," not in e.name and e.group != "Component" for e in v)


# ------------------------------------------------------------------------------------------
# the independent checker
# ------------------------------------------------------------------------------------------

SIZE_WORD = {"small": "small", "tiny": "small", "little": "small", "medium-sized": "medium", "mid-sized": "medium",
             "large": "large", "big": "large", "huge": "large"}
COUNT_WORD = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
              "eight": 8, "nine": 9}
CELL_NAME = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2), "left": (1, 0), "center": (1, 1),
             "right": (1, 2), "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2)}
CATEGORY = {
    "animals": lambda o: o["subgroup"].startswith("animal-"),
    "plants": lambda o: o["subgroup"].startswith("plant-"),
    "faces": lambda o: o["subgroup"].startswith("face-"),
    "hearts": lambda o: o["subgroup"] == "heart",
    "people": lambda o: o["subgroup"].startswith("person") or o["subgroup"] == "family",
    "food or drink items": lambda o: o["group"] == "Food & Drink",
    "vehicles": lambda o: o["subgroup"].startswith("transport-"),
    "flags": lambda o: o["group"] == "Flags",
    "symbols": lambda o: o["group"] == "Symbols",
}


def parse_position(text: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"(?:at|in|on) the (\w+(?: \w+)??)(?: corner| side)?", text)
    if not m:
        return None
    row, col, words = 1, 1, m.group(1).split()
    if len(words) == 2 and words[1] not in ("left", "right", "center", "middle"):
        return None
    for w in words:
        if w in ("top", "upper"):
            row = 0
        elif w in ("bottom", "lower"):
            row = 2
        elif w == "left":
            col = 0
        elif w == "right":
            col = 2
        elif w not in ("center", "middle"):
            return None
    return row, col


def parse_mention(text: str, forms: dict[str, tuple[str, bool, bool]]) -> list[tuple]:
    """All readings of "<count> [size] <name> [position]": (char, count, size, pos, singular, plural)."""
    count_word, _, rest = text.partition(" ")
    if count_word not in COUNT_WORD:
        return []
    readings = []
    for size in [None, *SIZE_WORD]:
        body = rest
        if size is not None:
            if not rest.startswith(size + " "):
                continue
            body = rest[len(size) + 1:]
        for form, (char, is_sing, is_plur) in forms.items():
            if body == form:
                readings.append((char, COUNT_WORD[count_word], SIZE_WORD.get(size), None, is_sing, is_plur))
            elif body.startswith(form + " "):
                pos = parse_position(body[len(form) + 1:])
                if pos is not None:
                    readings.append((char, COUNT_WORD[count_word], SIZE_WORD.get(size), pos, is_sing, is_plur))
    return readings


FRAMES = [
    r"(?P<list>.+) on an? (?P<bg>.+) background",
    r"an image of (?P<list>.+)",
    r"a picture showing (?P<list>.+)",
    r"there (?:is|are) (?P<list>.+)",
    r"an? (?P<bg>.+) background with (?P<list>.+)",
    r"(?P<total>\w+) emoji: (?P<list>.+)",
    r"(?P<list>.+), (?P<total>\w+) objects? in total",
    r"(?P<list>.+)",
]


def check_background(phrase: str, bg: dict) -> None:
    if m := re.fullmatch(r"(.+) to (.+) gradient", phrase):
        assert bg["kind"] == "gradient" and list(m.groups()) == bg["colors"], (phrase, bg)
    elif m := re.fullmatch(r"(?:speckled|textured) (.+)", phrase):
        assert bg["kind"] == "noise" and [m.group(1)] == bg["colors"], (phrase, bg)
    else:
        color = phrase.removeprefix("plain ")
        assert bg["kind"] == "solid" and [color] == bg["colors"], (phrase, bg)


def check_caption(caption: str, row: dict, forms: dict) -> None:
    assert caption.endswith(".") and caption[0].isupper(), caption
    text = caption[0].lower() + caption[1:-1]
    for frame in FRAMES:
        m = re.fullmatch(frame, text)
        if m:
            break
    parts = m.groupdict()
    objs = row["objects"]
    if parts.get("bg"):
        check_background(parts["bg"], row["background"])
    if parts.get("total"):
        assert COUNT_WORD[parts["total"]] == len(objs), caption
    mentions = re.split(r", and |, | and ", parts["list"])
    truth = Counter(o["char"] for o in objs)
    said = {}
    for mention in mentions:
        readings = parse_mention(mention, forms)
        assert len(readings) == 1, f"{caption!r}: cannot read {mention!r} unambiguously: {readings}"
        char, count, size, pos, is_sing, is_plur = readings[0]
        assert char not in said, f"{caption!r}: {char} mentioned twice"
        said[char] = count
        assert truth[char] == count, f"{caption!r}: says {count} x {char}, scene has {truth[char]}"
        assert (is_sing if count == 1 else is_plur), f"{caption!r}: number agreement in {mention!r}"
        mine = [o for o in objs if o["char"] == char]
        if size is not None:
            assert all(o["size"] == size for o in mine), f"{caption!r}: wrong size in {mention!r}"
        if pos is not None:
            assert count == 1 and (mine[0]["row"], mine[0]["col"]) == pos, f"{caption!r}: wrong position in {mention!r}"
    assert said == dict(truth), f"{caption!r} does not mention every object: {said} vs {dict(truth)}"


def forms_of(vocab: list[dict]) -> dict[str, tuple[str, bool, bool]]:
    forms: dict[str, tuple[str, bool, bool]] = {}
    for v in vocab:
        forms[v["name"]] = (v["char"], True, v["plural"] == v["name"])
        if v["plural"] != v["name"]:
            forms[v["plural"]] = (v["char"], False, True)
    return forms


def check_geometry(row: dict, image: np.ndarray, px: dict) -> None:
    H, W = image.shape[:2]
    objs = row["objects"]
    assert 1 <= len(objs) <= 4
    cells = [(o["row"], o["col"]) for o in objs]
    assert len(set(cells)) == len(cells), "two objects in one cell"
    for o in objs:
        x0, y0, x1, y1 = o["box"]
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
        assert int(((y0 + y1) / 2) // (H / 3)) == o["row"] and int(((x0 + x1) / 2) // (W / 3)) == o["col"]
        lo, hi = px[o["size"]]
        assert lo <= max(x1 - x0, y1 - y0) <= hi
        assert image[y0:y1, x0:x1].std() > 5, "nothing drawn in the box"
    sizes = {o["size"] for o in objs}
    groups = {o["group"] for o in objs}
    t = row["scene_type"]
    if t == "simple":
        assert len(objs) == 1 and sizes == {"large"}
    elif t == "complex":
        assert len(objs) >= 3 and "large" not in sizes
    elif t == "fine-grained":
        assert sizes == {"small"}
    else:
        assert t == "abstract" and groups <= {"Symbols", "Flags"}
    if t != "abstract":
        assert not groups & {"Symbols", "Flags"}
    if len(objs) > 1:
        assert "large" not in sizes
        for i, a in enumerate(objs):  # small/medium objects never overlap
            for b in objs[i + 1:]:
                ax0, ay0, ax1, ay1 = a["box"]
                bx0, by0, bx1, by1 = b["box"]
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
    for char in {o["char"] for o in objs}:  # identical emoji share a size class
        assert len({o["size"] for o in objs if o["char"] == char}) == 1


def test_every_caption_is_true_to_its_annotation(root, vocab):
    forms = forms_of(vocab)
    px = {"small": (20, 24), "medium": (34, 42), "large": (64, 80)}
    n_caps = 0
    types = Counter()
    for split in SPLITS:
        ds = ImageTextDataset(root, split)
        for i, row in enumerate(ds.manifest):
            check_geometry(row, np.asarray(ds.images[i]), px)
            assert len(row["captions"]) == 5 and len(set(row["captions"])) >= 4
            for cap in row["captions"]:
                check_caption(cap, row, forms)
                n_caps += 1
            types[row["scene_type"]] += 1
    assert n_caps == 5 * (48 + 16 + 40)
    assert set(types) == {"simple", "complex", "fine-grained", "abstract"}


def expected_answer(question: str, row: dict, vocab: list[dict]) -> tuple[str, str]:
    """(answer, answer_type) recomputed from the annotation alone."""
    objs = row["objects"]
    names = {v["name"] for v in vocab}
    plural_to_name = {v["plural"]: v["name"] for v in vocab}
    with_name = lambda n: [o for o in objs if o["name"] == n]  # noqa: E731
    if m := re.fullmatch(r"is there an? (.+) at the (.+)\?", question):
        return ("yes" if any((o["row"], o["col"]) == CELL_NAME[m.group(2)] for o in with_name(m.group(1))) else "no"), "yes/no"
    if m := re.fullmatch(r"is the (.+) (small|medium|large)\?", question):
        (o,) = with_name(m.group(1))
        return ("yes" if o["size"] == m.group(2) else "no"), "yes/no"
    if m := re.fullmatch(r"are there any (.+)\?", question):
        return ("yes" if any(CATEGORY[m.group(1)](o) for o in objs) else "no"), "yes/no"
    if m := re.fullmatch(r"is there an? (.+)\?", question):
        assert m.group(1) in names
        return ("yes" if with_name(m.group(1)) else "no"), "yes/no"
    if question in ("how many objects are there?", "how many emoji are in the image?"):
        return str(len(objs)), "number"
    if m := re.fullmatch(r"how many (small|medium|large) objects are there\?", question):
        return str(sum(o["size"] == m.group(1) for o in objs)), "number"
    if m := re.fullmatch(r"how many (.+) are there\?", question):
        what = m.group(1)
        if what in CATEGORY:
            return str(sum(CATEGORY[what](o) for o in objs)), "number"
        return str(len(with_name(plural_to_name[what]))), "number"
    if m := re.fullmatch(r"what size is the (.+)\?", question):
        (o,) = with_name(m.group(1))
        return o["size"], "other"
    if m := re.fullmatch(r"where is the (.+)\?", question):
        (o,) = with_name(m.group(1))
        return {v: k for k, v in CELL_NAME.items()}[(o["row"], o["col"])], "other"
    if question == "what color is the background?":
        assert row["background"]["kind"] == "solid"
        return row["background"]["colors"][0], "other"
    if m := re.fullmatch(r"what is at the (.+)\?", question):
        (o,) = [o for o in objs if (o["row"], o["col"]) == CELL_NAME[m.group(1)]]
        return o["name"].lower(), "other"
    raise AssertionError(f"question the checker cannot read: {question!r}")


def test_every_vqa_answer_is_true_to_its_annotation(root, vocab):
    kinds = Counter()
    answers = Counter()
    for split in SPLITS:
        rows = {r["image_id"]: r for r in ImageTextDataset(root, split).manifest}
        qj, aj = load_vqa(root, split)
        assert set(qj) >= {"info", "license", "data_subtype", "task_type", "questions"} and qj["data_subtype"] == split
        assert set(aj) >= {"info", "license", "data_subtype", "annotations"}
        assert qj["info"]["template_generated"] is True and "TEMPLATE-GENERATED" in qj["info"]["description"]
        assert len(qj["questions"]) == len(aj["annotations"]) == 6 * len(rows)
        assert len({q["question_id"] for q in qj["questions"]}) == len(qj["questions"])
        for q, a in zip(qj["questions"], aj["annotations"]):
            assert set(q) == {"image_id", "question", "question_id"}
            assert set(a) == {"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer", "answers"}
            assert a["question_id"] == q["question_id"] and a["image_id"] == q["image_id"]
            want, want_type = expected_answer(q["question"], rows[q["image_id"]], vocab)
            assert a["multiple_choice_answer"] == want, (q["question"], a["multiple_choice_answer"], want)
            assert a["answer_type"] == want_type
            assert len(a["answers"]) == 10 and {x["answer"] for x in a["answers"]} == {want}
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            kinds[want_type] += 1
            answers[(want_type, want)] += 1
    assert set(kinds) == {"yes/no", "number", "other"}
    assert answers[("yes/no", "yes")] > 0 and answers[("yes/no", "no")] > 0


def test_checker_catches_a_wrong_caption(root, vocab):
    row = ImageTextDataset(root, "test").manifest[0]
    forms = forms_of(vocab)
    other = next(v for v in vocab if v["char"] not in {o["char"] for o in row["objects"]})
    with pytest.raises(AssertionError):
        check_caption(f"A {other['name']}.", row, forms)
    o = row["objects"][0]
    wrong = next(k for k, v in CELL_NAME.items() if v != (o["row"], o["col"]))
    rest = [f"{'a'} {x['name']}" for x in row["objects"][1:]]
    with pytest.raises(AssertionError):
        check_caption("A " + " and ".join([f"{o['name']} at the {wrong}", *rest]) + ".", row, forms)


# ------------------------------------------------------------------------------------------
# params validation, atomic output, the stage entry point
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,key", [
    ({"vocab_size": 3}, "prepare.emojiscenes.vocab_size"),
    ({"max_objects": 10}, "prepare.emojiscenes.max_objects"),
    ({"vqa_per_image": 11}, "prepare.emojiscenes.vqa_per_image"),
    ({"small_px": (30, 20)}, "prepare.emojiscenes.small_px"),
    ({"scene_mix": {"simple": 1.0, "busy": 1.0}}, "prepare.emojiscenes.scene_mix"),
    ({"fashion_mnist": 15}, "prepare.emojiscenes.fashion_mnist"),
])
def test_bad_values_name_the_key(tmp_path, overrides, key):
    with pytest.raises(ParamsError, match=re.escape(f"key '{key}'")):
        build_dataset(emoji_params(0, **overrides), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_interrupted_build_leaves_no_output_and_keeps_the_old_one(tmp_path, monkeypatch):
    from cmapkd.data import build as build_mod

    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("old")
    calls = {"n": 0}
    real = build_mod.render_scene

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 30:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(build_mod, "render_scene", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(emoji_params(0), out, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["marker"]


def test_missing_source_is_a_clear_error(tmp_path, monkeypatch):
    from cmapkd.data import fashion_mnist

    monkeypatch.setattr(fashion_mnist, "ROOT_CANDIDATES", (str(tmp_path / "nowhere"),))
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        build_dataset(emoji_params(0), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_stage_main_writes_dataset_and_contact_sheet(tmp_path, project_root):
    from PIL import Image

    from cmapkd.stages.prepare import main

    raw = yaml.safe_load((project_root / "params.yaml").read_text())
    raw["prepare"]["emojiscenes"].update(vocab_size=18, splits={"train": 8, "val": 4, "test": 8},
                                         zeroshot_emoji=9, fashion_mnist=10, contact_sheet=4)
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(raw))
    sheet = tmp_path / "sheet.png"
    rc = main(["--params", str(pfile), "--out", str(tmp_path / "es"), "--contact-sheet", str(sheet), "--no-progress"])
    assert rc == 0
    assert read_info(tmp_path / "es")["counts"]["splits"] == {"train": 8, "val": 4, "test": 8}
    with Image.open(sheet) as im:
        assert im.width > 500 and im.height > 300
    # a bad value is reported with the key, exit code 2
    raw["prepare"]["shard_size"] = 0
    pfile.write_text(yaml.safe_dump(raw))
    assert main(["--params", str(pfile), "--out", str(tmp_path / "es2"), "--contact-sheet", ""]) == 2
    assert not (tmp_path / "es2").exists()
