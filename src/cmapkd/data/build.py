"""Build a processed dataset (the body of the `prepare` stage).

    build_dataset(params, out_dir, progress=True) -> info dict

`params` is the typed `Params` (seed + prepare). EmojiScenes is generated from the seed; the
paper formats read COCO / Flickr30K Karpathy files, ImageNet val and VQAv2 from local paths.
Both write through the same shard writer, so later stages read one format.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from cmapkd.config import PARAMS_FILE, ParamsError, PrepareParams, to_dict
from cmapkd.data import emoji as emoji_mod
from cmapkd.data import fashion_mnist, loaders
from cmapkd.data.errors import DataError, load_image, resize_center_crop
from cmapkd.data.scenes import (
    GENERATOR_VERSION, SCENE_TYPES, SceneConfig, layout_scene, make_captions, make_vqa, render_scene, stream,
)
from cmapkd.data.store import SPLITS, ShardWriter, atomic_dir, save_npy, sha256_file, write_info, write_json, write_jsonl

log = logging.getLogger("cmapkd.data")

DATASET_NAMES = {"emojiscenes": "emojiscenes", "coco_karpathy": "coco", "flickr30k_karpathy": "flickr30k"}
SPLIT_CODES = {"train": 1, "val": 2, "test": 3, "teacher_extra": 4}
EMOJI_TEMPLATES = ["an emoji of {}.", "a picture of {}.", "an icon of {}.", "a cartoon of {}."]
VQA_LICENSE = {"name": "template-generated from EmojiScenes annotations", "url": ""}


def dataset_name(p: PrepareParams) -> str:
    return DATASET_NAMES[p.format]


# ------------------------------------------------------------------------------------------
# params validation
# ------------------------------------------------------------------------------------------


def validate_prepare(p: PrepareParams, file: str | Path = PARAMS_FILE) -> None:
    """Value checks the type schema cannot express; errors name the key."""

    def bad(key: str, msg: str):
        raise ParamsError(f"{file}: key 'prepare.{key}' {msg}")

    if p.resolution < 32:
        bad("resolution", f"must be >= 32, got {p.resolution}")
    if p.shard_size < 1:
        bad("shard_size", f"must be >= 1, got {p.shard_size}")
    if p.format == "emojiscenes":
        e = p.emojiscenes
        if e.vocab_size < len(emoji_mod.GROUPS):
            bad("emojiscenes.vocab_size", f"must be >= {len(emoji_mod.GROUPS)} (one per group), got {e.vocab_size}")
        for split in SPLITS:
            n = getattr(e.splits, split)
            if n < 1:
                bad(f"emojiscenes.splits.{split}", f"must be >= 1, got {n}")
            if n >= 1_000_000:
                bad(f"emojiscenes.splits.{split}", f"must be < 1000000, got {n}")
        if not 0 <= e.splits.teacher_extra < 1_000_000:
            bad("emojiscenes.splits.teacher_extra", f"must be in 0..999999, got {e.splits.teacher_extra}")
        if not 1 <= e.max_objects <= 9:
            bad("emojiscenes.max_objects", f"must be in 1..9 (a 3x3 grid), got {e.max_objects}")
        if e.captions_per_image < 1:
            bad("emojiscenes.captions_per_image", f"must be >= 1, got {e.captions_per_image}")
        if not 0 <= e.vqa_per_image <= 10:
            bad("emojiscenes.vqa_per_image", f"must be in 0..10, got {e.vqa_per_image}")
        for key, limit in (("small_px", p.resolution // 3), ("medium_px", p.resolution // 3), ("large_px", p.resolution)):
            lo, hi = getattr(e, key)
            if not 4 <= lo <= hi <= limit:
                bad(f"emojiscenes.{key}", f"must be [min, max] with 4 <= min <= max <= {limit}, got [{lo}, {hi}]")
        if any(k not in SCENE_TYPES for k in e.scene_mix):
            unknown = [k for k in e.scene_mix if k not in SCENE_TYPES]
            bad("emojiscenes.scene_mix", f"has unknown scene type(s) {unknown}; known: {list(SCENE_TYPES)}")
        if any(v < 0 for v in e.scene_mix.values()) or sum(e.scene_mix.values()) <= 0:
            bad("emojiscenes.scene_mix", "fractions must be >= 0 with a positive sum")
        if e.zeroshot_emoji < 0:
            bad("emojiscenes.zeroshot_emoji", f"must be >= 0, got {e.zeroshot_emoji}")
        if e.fashion_mnist < 0 or e.fashion_mnist % 10:
            bad("emojiscenes.fashion_mnist", f"must be a non-negative multiple of 10 (class-balanced), got {e.fashion_mnist}")
        if e.contact_sheet < 0:
            bad("emojiscenes.contact_sheet", f"must be >= 0, got {e.contact_sheet}")
    else:
        q = p.paper
        if not q.karpathy_json:
            bad("paper.karpathy_json", f"is empty but format is {p.format!r}: give the path of the Karpathy split file")
        if not q.image_root:
            bad("paper.image_root", f"is empty but format is {p.format!r}: give the image folder")
        if q.max_per_split < 0:
            bad("paper.max_per_split", f"must be >= 0, got {q.max_per_split}")
        if q.imagenet_per_class < 0:
            bad("paper.imagenet_per_class", f"must be >= 0, got {q.imagenet_per_class}")
        if len(q.vqa_questions) != len(q.vqa_annotations):
            bad("paper.vqa_annotations", f"has {len(q.vqa_annotations)} files but paper.vqa_questions has {len(q.vqa_questions)}")


# ------------------------------------------------------------------------------------------
# shared pieces
# ------------------------------------------------------------------------------------------


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", file=sys.stderr, mininterval=0.5, dynamic_ncols=True)


def write_zeroshot(root: Path, name: str, images: np.ndarray, labels: np.ndarray, classnames: list[str],
                   templates: list[str], extra: dict | None = None) -> None:
    d = root / "zeroshot" / name
    save_npy(d / "images.npy", images)
    save_npy(d / "labels.npy", labels.astype(np.int64))
    write_json(d / "classes.json", {"classnames": classnames, "templates": templates, **(extra or {})})


def _vqa_files(root: Path, split: str, questions: list[dict], annotations: list[dict], header: dict) -> None:
    info = header.get("info", {})
    lic = header.get("license", {})
    data_type = header.get("data_type", "")
    write_json(root / "vqa" / f"questions-{split}.json", {
        "info": info, "license": lic, "data_subtype": split, "data_type": data_type,
        "task_type": header.get("task_type", "Open-Ended"), "questions": questions,
    })
    write_json(root / "vqa" / f"annotations-{split}.json", {
        "info": info, "license": lic, "data_subtype": split, "data_type": data_type, "annotations": annotations,
    })


def _type_counts(n: int, mix: dict[str, float]) -> dict[str, int]:
    """Largest-remainder split of n scenes over the scene types (deterministic)."""
    total = sum(mix.values())
    exact = {t: n * mix.get(t, 0.0) / total for t in SCENE_TYPES}
    counts = {t: int(np.floor(v)) for t, v in exact.items()}
    rest = n - sum(counts.values())
    for t in sorted(SCENE_TYPES, key=lambda t: (-(exact[t] - counts[t]), SCENE_TYPES.index(t)))[:rest]:
        counts[t] += 1
    return counts


# ------------------------------------------------------------------------------------------
# EmojiScenes
# ------------------------------------------------------------------------------------------


def build_emojiscenes(p: PrepareParams, seed: int, root: Path, progress: bool = True) -> dict:
    e = p.emojiscenes
    renderer = emoji_mod.GlyphRenderer()
    emoji_test = emoji_mod.find_file(emoji_mod.EMOJI_TEST_CANDIDATES, "emoji-test.txt", "unicode-data")
    vocab = emoji_mod.build_vocab(e.vocab_size, stream(seed, "vocab"), renderer, emoji_test)
    plurals = {v.char: v.plural for v in vocab}
    write_json(root / "vocab.json", {"emoji": [v.to_dict() for v in vocab], "groups": emoji_mod.GROUPS})
    cfg = SceneConfig(p.resolution, e.max_objects, {"small": e.small_px, "medium": e.medium_px, "large": e.large_px})
    counts: dict = {"splits": {}, "scene_types": {}, "vqa_questions": {}, "captions": {}}
    header = {
        "info": {"description": "EmojiScenes VQA: TEMPLATE-GENERATED questions and answers from scene annotations "
                                "(not human-written; 10 identical answers per question)",
                 "version": GENERATOR_VERSION, "template_generated": True},
        "license": VQA_LICENSE, "task_type": "Open-Ended", "data_type": "emojiscenes",
    }
    # teacher_extra: scenes only the teacher's heads train on (drawn from their own streams, so the
    # other splits are byte-identical with or without them)
    for split in SPLITS + (("teacher_extra",) if e.splits.teacher_extra else ()):
        n = getattr(e.splits, split)
        tc = _type_counts(n, e.scene_mix)
        types = [t for t in SCENE_TYPES for _ in range(tc[t])]
        types = [types[int(i)] for i in stream(seed, "types", split).permutation(n)]
        writer = ShardWriter(root, split, p.shard_size, p.resolution)
        rows, questions, annotations = [], [], []
        for i in _progress(range(n), n, f"emojiscenes {split}", progress):
            ann = layout_scene(stream(seed, "layout", split, i), types[i], vocab, cfg, renderer)
            img = render_scene(ann, cfg, renderer, stream(seed, "pixels", split, i))
            shard, off = writer.add(img)
            image_id = SPLIT_CODES[split] * 1_000_000 + i
            caps = make_captions(ann, plurals, e.captions_per_image, stream(seed, "captions", split, i))
            rows.append({"index": i, "id": f"emojiscenes-{split}-{i:06d}", "image_id": image_id, "shard": shard,
                         "offset": off, "captions": caps, **ann})
            for k, qa in enumerate(make_vqa(ann, vocab, e.vqa_per_image, stream(seed, "vqa", split, i))):
                qid = image_id * 10 + k
                questions.append({"image_id": image_id, "question": qa["question"], "question_id": qid})
                annotations.append({
                    "question_id": qid, "image_id": image_id, "question_type": qa["question_type"],
                    "answer_type": qa["answer_type"], "multiple_choice_answer": qa["answer"],
                    "answers": [{"answer": qa["answer"], "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)],
                })
        writer.close()
        write_jsonl(root / f"manifest-{split}.jsonl", rows)
        _vqa_files(root, split, questions, annotations, header)
        counts["splits"][split] = n
        counts["scene_types"][split] = tc
        counts["captions"][split] = sum(len(r["captions"]) for r in rows)
        counts["vqa_questions"][split] = len(questions)

    # zero-shot: single-object emoji scenes labelled by group and subgroup
    zs = {}
    if e.zeroshot_emoji:
        groups = list(emoji_mod.GROUPS)
        subgroups = list(dict.fromkeys(v.subgroup for v in vocab))
        by_group = {g: [v for v in vocab if v.group == g] for g in groups}
        imgs = np.empty((e.zeroshot_emoji, p.resolution, p.resolution, 3), np.uint8)
        glab = np.empty(e.zeroshot_emoji, np.int64)
        slab = np.empty(e.zeroshot_emoji, np.int64)
        chars = []
        for k in _progress(range(e.zeroshot_emoji), e.zeroshot_emoji, "zero-shot emoji", progress):
            rng = stream(seed, "zeroshot", k)
            g = groups[k % len(groups)]
            em = by_group[g][int(rng.integers(len(by_group[g])))]
            ann = layout_scene(rng, "simple", vocab, cfg, renderer, single=em)
            imgs[k] = render_scene(ann, cfg, renderer, stream(seed, "zeroshot-pixels", k))
            glab[k], slab[k] = groups.index(g), subgroups.index(em.subgroup)
            chars.append(em.char)
        write_zeroshot(root, "emoji_groups", imgs, glab, [emoji_mod.GROUPS[g] for g in groups], EMOJI_TEMPLATES,
                       {"source_groups": groups, "emoji": chars})
        write_zeroshot(root, "emoji_subgroups", imgs, slab, [emoji_mod.subgroup_classname(s) for s in subgroups],
                       EMOJI_TEMPLATES, {"source_subgroups": subgroups, "emoji": chars})
        zs["emoji_groups"] = zs["emoji_subgroups"] = e.zeroshot_emoji
    if e.fashion_mnist:
        fm_root = fashion_mnist.find_root()
        imgs, labels = fashion_mnist.load_test_subset(e.fashion_mnist, p.resolution, stream(seed, "fashion_mnist"), fm_root)
        write_zeroshot(root, "fashion_mnist", imgs, labels, fashion_mnist.CLASSNAMES, fashion_mnist.TEMPLATES,
                       {"source": str(fm_root), "subset": "class-balanced seeded subset of the 10k test images"})
        zs["fashion_mnist"] = len(labels)
    counts["zeroshot"] = zs
    counts["vocab"] = len(vocab)
    sources = {"emoji_test": {"path": str(emoji_test), "sha256": sha256_file(emoji_test)},
               "font": {"path": str(renderer.font_path), "sha256": sha256_file(renderer.font_path)}}
    return {"counts": counts, "sources": sources, "skipped": {"count": 0, "items": []}}


# ------------------------------------------------------------------------------------------
# paper setting: COCO / Flickr30K (Karpathy) + ImageNet val + VQAv2
# ------------------------------------------------------------------------------------------


class _Skipper:
    def __init__(self, allow: bool):
        self.allow, self.items = allow, []

    def image(self, path: Path, resolution: int) -> np.ndarray | None:
        try:
            return resize_center_crop(load_image(path), resolution)
        except DataError as err:
            if not self.allow:
                raise
            self.items.append({"file": err.path, "problem": err.problem})
            log.warning("skipping %s", err)
            return None


def build_paper(p: PrepareParams, seed: int, root: Path, progress: bool = True) -> dict:
    q = p.paper
    name = dataset_name(p)
    splits = loaders.load_karpathy(q.karpathy_json, q.image_root, name, q.restval_to_train, q.max_per_split)
    skip = _Skipper(p.skip_bad_images)
    counts: dict = {"splits": {}, "captions": {}, "vqa_questions": {}}
    id_split: dict[int, str] = {}
    for split in SPLITS:
        recs = splits[split]
        writer = ShardWriter(root, split, p.shard_size, p.resolution)
        rows = []
        for rec in _progress(recs, len(recs), f"{name} {split}", progress):
            img = skip.image(rec.path, p.resolution)
            if img is None:
                continue
            shard, off = writer.add(img)
            rows.append({"index": len(rows), "id": f"{name}-{rec.image_id}", "image_id": rec.image_id,
                         "file": rec.file, "shard": shard, "offset": off, "captions": rec.captions})
            id_split[rec.image_id] = split
        writer.close()
        write_jsonl(root / f"manifest-{split}.jsonl", rows)
        counts["splits"][split] = len(rows)
        counts["captions"][split] = sum(len(r["captions"]) for r in rows)
    if q.vqa_questions:
        header, qs, ans = loaders.load_vqav2(q.vqa_questions, q.vqa_annotations)
        per = {s: ([], []) for s in SPLITS}
        dropped = 0
        for qq, aa in zip(qs, ans):
            s = id_split.get(qq["image_id"])
            if s is None:
                dropped += 1
                continue
            per[s][0].append(qq)
            per[s][1].append(aa)
        for s in SPLITS:
            _vqa_files(root, s, per[s][0], per[s][1], header)
            counts["vqa_questions"][s] = len(per[s][0])
        counts["vqa_dropped_no_image"] = dropped
    zs = {}
    if q.imagenet_val_root:
        items = loaders.list_imagenet_val(q.imagenet_val_root, q.imagenet_per_class)
        classnames, templates = loaders.imagenet_classnames_templates(q.imagenet_templates)
        path = root / "zeroshot" / "imagenet" / "images.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(items), p.resolution, p.resolution, 3))
        labels = []
        n = 0
        for fpath, label in _progress(items, len(items), "imagenet val", progress):
            img = skip.image(fpath, p.resolution)
            if img is None:
                continue
            buf[n] = img
            labels.append(label)
            n += 1
        buf.flush()
        del buf
        if n < len(items):  # skipped images: rewrite without the unused tail
            arr = np.load(path, mmap_mode="r")[:n].copy()
            save_npy(path, arr)
        save_npy(path.parent / "labels.npy", np.asarray(labels, np.int64))
        write_json(path.parent / "classes.json", {"classnames": classnames, "templates": templates,
                                                  "source": f"open_clip.zero_shot_metadata (IMAGENET_CLASSNAMES, {q.imagenet_templates.upper()}_IMAGENET_TEMPLATES)"})
        zs["imagenet"] = n
    counts["zeroshot"] = zs
    sources = {"karpathy_json": {"path": q.karpathy_json, "sha256": sha256_file(Path(q.karpathy_json))}}
    return {"counts": counts, "sources": sources, "skipped": {"count": len(skip.items), "items": skip.items}}


# ------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------


def build_dataset(params, out_dir: str | Path, progress: bool = True, params_file: str | Path = PARAMS_FILE) -> dict:
    """Build the dataset described by `params.prepare` (and `params.seed`) into `out_dir`,
    atomically. Returns the info dict (also written as `out_dir/info.json`)."""
    p: PrepareParams = params.prepare
    validate_prepare(p, params_file)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if p.format == "emojiscenes":
            body = build_emojiscenes(p, params.seed, tmp, progress)
        else:
            body = build_paper(p, params.seed, tmp, progress)
        info = {
            "dataset": dataset_name(p), "format": p.format, "generator_version": GENERATOR_VERSION,
            "seed": params.seed, "resolution": p.resolution, "params": to_dict(p), **body,
        }
        if body["skipped"]["count"]:
            log.warning("skipped %d bad image(s); listed in info.json", body["skipped"]["count"])
        info = write_info(tmp, info)
    return info
