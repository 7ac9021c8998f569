"""Paper-setting loaders: the public datasets read as their publishers ship them.

- COCO / Flickr30K captions: Karpathy split files (`dataset_coco.json`, `dataset_flickr30k.json`):
  {"images": [{"filepath" (COCO only), "filename", "split": train|restval|val|test,
  "sentences": [{"raw": ...}], "cocoid" | "imgid", ...}], "dataset": ...} plus an image root.
- ImageNet-1k val: one folder per WordNet id; class index = position in the sorted 1000 wnids
  (timm's imagenet_synsets.txt), names and templates from `open_clip.zero_shot_metadata`.
- VQAv2: `v2_OpenEnded_mscoco_*_questions.json` + `v2_mscoco_*_annotations.json` over COCO ids.

Every problem becomes a `DataError` naming the file and the key/row (see errors.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cmapkd.data.errors import DataError, read_json, require_keys

KARPATHY_SPLITS = ("train", "restval", "val", "test")
IMAGE_EXTS = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    file: str  # path relative to the image root, as in the split file
    path: Path
    captions: list[str]


def load_karpathy(json_path: str | Path, image_root: str | Path, dataset: str,
                  restval_to_train: bool = True, max_per_split: int = 0) -> dict[str, list[ImageRecord]]:
    """Karpathy split file -> {"train"|"val"|"test": [ImageRecord]} in file order.
    `dataset` is "coco" (needs `filepath`) or "flickr30k"."""
    json_path = Path(json_path)
    data = read_json(json_path)
    require_keys(data, ["images"], json_path, "top level")
    if not isinstance(data["images"], list):
        raise DataError(json_path, "'images' is not a list")
    needed = ["filename", "split", "sentences"] + (["filepath"] if dataset == "coco" else [])
    out: dict[str, list[ImageRecord]] = {"train": [], "val": [], "test": []}
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        require_keys(img, needed, json_path, where)
        split = img["split"]
        if split not in KARPATHY_SPLITS:
            raise DataError(json_path, f"{where}.split is {split!r}, expected one of {', '.join(KARPATHY_SPLITS)}")
        if split == "restval":
            if not restval_to_train:
                continue
            split = "train"
        sents = img["sentences"]
        if not isinstance(sents, list) or not sents:
            raise DataError(json_path, f"{where}.sentences is empty or not a list")
        caps = []
        for j, s in enumerate(sents):
            require_keys(s, ["raw"], json_path, f"{where}.sentences[{j}]")
            raw = s["raw"]
            if not isinstance(raw, str):
                raise DataError(json_path, f"{where}.sentences[{j}].raw is not a string")
            if not raw.strip():
                raise DataError(json_path, f"caption is empty ({where}.sentences[{j}])")
            caps.append(raw.strip())
        rel = f"{img['filepath']}/{img['filename']}" if dataset == "coco" else str(img["filename"])
        image_id = img.get("cocoid", img.get("imgid", i))
        if not isinstance(image_id, int):
            raise DataError(json_path, f"{where}: image id {image_id!r} is not an integer")
        if max_per_split and len(out[split]) >= max_per_split:
            continue
        out[split].append(ImageRecord(image_id, rel, Path(image_root) / rel, caps))
    return out


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (sorted), from timm's metadata."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def imagenet_classnames_templates(templates: str = "openai") -> tuple[list[str], list[str]]:
    """open_clip's ImageNet class names and prompt templates: `openai` (CLIP's 80) or `simple` (7)."""
    from open_clip import zero_shot_metadata as z

    source = {"openai": z.OPENAI_IMAGENET_TEMPLATES, "simple": z.SIMPLE_IMAGENET_TEMPLATES}[templates]
    templates = [t("{}") if callable(t) else str(t) for t in source]
    return list(z.IMAGENET_CLASSNAMES), templates


def list_imagenet_val(root: str | Path, per_class: int = 0) -> list[tuple[Path, int]]:
    """(image path, class index) for ImageNet val laid out as root/<wnid>/*.JPEG, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "ImageNet val folder not found")
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    out = []
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DataError(root, "no class folders (expected one folder per WordNet id, e.g. n01440764/)")
    for d in folders:
        if d.name not in index:
            raise DataError(d, "folder name is not an ImageNet-1k WordNet id")
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if per_class:
            files = files[:per_class]
        out += [(p, index[d.name]) for p in files]
    return out


_Q_KEYS = ["image_id", "question", "question_id"]
_A_KEYS = ["question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer", "answers"]


def load_vqav2(question_files: list[str], annotation_files: list[str]) -> tuple[dict, list[dict], list[dict]]:
    """Read VQAv2 question + annotation files (paired by position). Returns (header from the first
    questions file, questions, annotations) with every question matched to its annotation."""
    if len(question_files) != len(annotation_files):
        raise DataError(question_files[0] if question_files else "params.yaml",
                        f"{len(question_files)} VQA question files but {len(annotation_files)} annotation files")
    header: dict = {}
    questions: list[dict] = []
    annotations: list[dict] = []
    for qf, af in zip(question_files, annotation_files):
        qd, ad = read_json(qf), read_json(af)
        require_keys(qd, ["questions"], qf, "top level")
        require_keys(ad, ["annotations"], af, "top level")
        if not header:
            header = {k: qd[k] for k in ("info", "license", "task_type", "data_type") if k in qd}
        by_qid = {}
        for i, a in enumerate(ad["annotations"]):
            require_keys(a, _A_KEYS, af, f"annotations[{i}]")
            if not isinstance(a["answers"], list) or not a["answers"]:
                raise DataError(af, f"annotations[{i}].answers is empty or not a list")
            for j, ans in enumerate(a["answers"]):
                require_keys(ans, ["answer"], af, f"annotations[{i}].answers[{j}]")
            by_qid[a["question_id"]] = a
        for i, q in enumerate(qd["questions"]):
            require_keys(q, _Q_KEYS, qf, f"questions[{i}]")
            if not str(q["question"]).strip():
                raise DataError(qf, f"question is empty (questions[{i}])")
            a = by_qid.get(q["question_id"])
            if a is None:
                raise DataError(af, f"no annotation for question_id {q['question_id']} (questions[{i}] of {qf})")
            if a["image_id"] != q["image_id"]:
                raise DataError(af, f"question_id {q['question_id']}: image_id {a['image_id']} != {q['image_id']} in {qf}")
            questions.append(q)
            annotations.append(a)
    return header, questions, annotations
