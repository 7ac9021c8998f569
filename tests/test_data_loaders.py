"""Paper-setting loaders on fixture files written in the exact public formats (Karpathy split
files for COCO and Flickr30K, ImageNet val folders, VQAv2 questions/annotations), and the clear
errors for bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import paper_params
from PIL import Image

from cmapkd.config import ParamsError
from cmapkd.data import DataError, ImageTextDataset, ZeroShotSet, load_vqa, read_info
from cmapkd.data.build import build_dataset

VQA_INFO = {"description": "This is v2.0 of the VQA dataset.", "url": "http://visualqa.org", "version": "2.0",
            "year": 2017, "contributor": "VQA Team", "date_created": "2017-04-26 17:07:13"}
VQA_LICENSE = {"url": "http://creativecommons.org/licenses/by/4.0/",
               "name": "Creative Commons Attribution 4.0 International License"}


def jpeg(path: Path, color: tuple[int, int, int], size=(48, 40)) -> bytes:
    """A small JPEG with a solid colour and a black left edge (to check the centre crop)."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = color
    arr[:, :4] = 0
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def sentence(raw: str, imgid: int, sentid: int) -> dict:
    return {"tokens": raw.lower().strip(".").split(), "raw": raw, "imgid": imgid, "sentid": sentid}


COCO_IMAGES = [  # (split, folder, cocoid, colour)
    ("train", "train2014", 9, (200, 30, 30)),
    ("train", "train2014", 25, (30, 200, 30)),
    ("restval", "val2014", 42, (30, 30, 200)),
    ("val", "val2014", 73, (200, 200, 30)),
    ("test", "val2014", 74, (30, 200, 200)),
    ("test", "val2014", 133, (200, 30, 200)),
]


def write_coco(root: Path) -> Path:
    images = []
    for i, (split, folder, cocoid, color) in enumerate(COCO_IMAGES):
        fname = f"COCO_{folder}_{cocoid:012d}.jpg"
        jpeg(root / folder / fname, color)
        sents = [sentence(f"Image {cocoid} caption {k}. Café ✓", i, 5 * i + k) for k in range(5)]
        images.append({"filepath": folder, "sentids": [s["sentid"] for s in sents], "filename": fname, "imgid": i,
                       "split": split, "sentences": sents, "cocoid": cocoid})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}), encoding="utf-8")
    return path


def write_vqa(root: Path, image_ids: list[int]) -> tuple[Path, Path]:
    qs, anns = [], []
    for image_id in image_ids:
        for k, (q, a, at, qt) in enumerate([("What color is it?", "red", "other", "what color is the"),
                                             ("Is it a photo?", "yes", "yes/no", "is it a")]):
            qid = image_id * 1000 + k
            qs.append({"image_id": image_id, "question": q, "question_id": qid})
            anns.append({"question_type": qt, "multiple_choice_answer": a, "answers": [
                {"answer": a if j < 8 else "maybe", "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)],
                "image_id": image_id, "answer_type": at, "question_id": qid})
    qf = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    af = root / "v2_mscoco_val2014_annotations.json"
    qf.write_text(json.dumps({"info": VQA_INFO, "task_type": "Open-Ended", "data_type": "mscoco",
                              "license": VQA_LICENSE, "data_subtype": "val2014", "questions": qs}))
    af.write_text(json.dumps({"info": VQA_INFO, "license": VQA_LICENSE, "data_subtype": "val2014",
                              "annotations": anns, "data_type": "mscoco"}))
    return qf, af


def write_imagenet(root: Path) -> Path:
    val = root / "val"
    for w, color in (("n01440764", (10, 120, 10)), ("n01443537", (240, 140, 0))):
        for k in range(2):
            jpeg(val / w / f"ILSVRC2012_val_0000{k}{w[-1]}.JPEG", color, size=(40, 48))
    return val


def test_coco_karpathy_with_imagenet_and_vqa(tmp_path):
    kp = write_coco(tmp_path / "coco")
    qf, af = write_vqa(tmp_path / "coco", [74, 133, 42, 999])  # 999: not in the split file
    val = write_imagenet(tmp_path / "imagenet")
    params = paper_params("coco_karpathy", karpathy_json=str(kp), image_root=str(tmp_path / "coco"),
                          imagenet_val_root=str(val), imagenet_per_class=1,
                          vqa_questions=[str(qf)], vqa_annotations=[str(af)])
    out = tmp_path / "processed" / "coco"
    info = build_dataset(params, out, progress=False)
    assert info["dataset"] == "coco" and info["counts"]["splits"] == {"train": 3, "val": 1, "test": 2}
    train = ImageTextDataset(out, "train")
    assert [r["image_id"] for r in train.manifest] == [9, 25, 42]  # restval joins train, file order kept
    assert train.manifest[2]["file"] == "val2014/COCO_val2014_000000000042.jpg"
    assert train.captions[0] == [f"Image 9 caption {k}. Café ✓" for k in range(5)]
    assert len(train.text_to_image()) == 15
    # 48x40 -> shortest side 32 -> centre crop 32x32: the black left edge is cropped away
    img = np.asarray(train.images[0]).astype(int)
    assert img.shape == (32, 32, 3) and np.abs(img.mean((0, 1)) - [200, 30, 30]).max() < 12
    assert np.asarray(ImageTextDataset(out, "test").images[1]).astype(int).mean((0, 1))[1] < 60  # (200,30,200)
    assert np.load(out / "images-train-000.npy").shape == (2, 32, 32, 3)  # shard_size 2
    # VQA: questions follow their image into its split; the one for an unknown image is dropped
    qj, aj = load_vqa(out, "test")
    assert [q["image_id"] for q in qj["questions"]] == [74, 74, 133, 133]
    assert qj["info"] == VQA_INFO and qj["data_subtype"] == "test" and qj["task_type"] == "Open-Ended"
    assert aj["annotations"][0]["answers"][9]["answer"] == "maybe" and aj["annotations"][0]["multiple_choice_answer"] == "red"
    assert [q["image_id"] for q in load_vqa(out, "train")[0]["questions"]] == [42, 42]
    assert load_vqa(out, "val")[0]["questions"] == []
    assert info["counts"]["vqa_dropped_no_image"] == 2
    # ImageNet: class index = position of the wnid among the 1000 sorted ids; names from open_clip
    zs = ZeroShotSet(out, "imagenet")
    assert zs.labels.tolist() == [0, 1] and len(zs.classnames) == 1000
    assert zs.classnames[:2] == ["tench", "goldfish"]
    assert len(zs.templates) == 80 and zs.templates[0] == "a bad photo of a {}."
    # 40x48 portrait: width -> 32, height cropped; the black left edge (4 px -> ~3 px) stays
    zimg = np.asarray(zs.images[1]).astype(int)
    assert np.abs(zimg[:, 8:].mean((0, 1)) - [240, 140, 0]).max() < 8 and zimg[:, :2].mean() < 40
    assert read_info(out)["digest"] == info["digest"]


def test_coco_options_restval_and_max_per_split(tmp_path):
    kp = write_coco(tmp_path)
    p = paper_params("coco_karpathy", karpathy_json=str(kp), image_root=str(tmp_path), restval_to_train=False,
                     max_per_split=1)
    info = build_dataset(p, tmp_path / "out", progress=False)
    assert info["counts"]["splits"] == {"train": 1, "val": 1, "test": 1}
    assert ImageTextDataset(tmp_path / "out", "train").manifest[0]["image_id"] == 9


def test_flickr30k_karpathy(tmp_path):
    images = []
    for i, split in enumerate(["train", "train", "val", "test"]):
        fname = f"10000927{i}.jpg"
        jpeg(tmp_path / "flickr30k-images" / fname, (40 * i + 10, 90, 160))
        sents = [sentence(f"Flickr image {i}, person {k}.", i, 5 * i + k) for k in range(5)]
        images.append({"sentids": [s["sentid"] for s in sents], "imgid": i, "sentences": sents, "split": split,
                       "filename": fname})
    kp = tmp_path / "dataset_flickr30k.json"
    kp.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    out = tmp_path / "processed" / "flickr30k"
    info = build_dataset(paper_params("flickr30k_karpathy", karpathy_json=str(kp),
                                      image_root=str(tmp_path / "flickr30k-images")), out, progress=False)
    assert info["dataset"] == "flickr30k" and info["counts"]["splits"] == {"train": 2, "val": 1, "test": 1}
    test = ImageTextDataset(out, "test")
    assert test.manifest[0]["file"] == "100009273.jpg" and test.manifest[0]["image_id"] == 3
    assert test.captions[0][4] == "Flickr image 3, person 4."
    assert np.abs(np.asarray(test.images[0]).astype(int).mean((0, 1)) - [130, 90, 160]).max() < 12


# ------------------------------------------------------------------------------------------
# bad input: each gives a clear error naming the file and the problem, and no output
# ------------------------------------------------------------------------------------------


def _coco_params(tmp_path: Path, kp: Path, skip: bool = False, **kw):
    return paper_params("coco_karpathy", skip=skip, karpathy_json=str(kp), image_root=str(tmp_path), **kw)


def _expect_error(tmp_path: Path, params, *fragments: str) -> str:
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        build_dataset(params, out, progress=False)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, msg
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return msg


def test_truncated_jpeg(tmp_path):
    kp = write_coco(tmp_path)
    bad = tmp_path / "val2014" / "COCO_val2014_000000000073.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    _expect_error(tmp_path, _coco_params(tmp_path, kp), f"{bad}: cannot decode image (truncated)")


def test_corrupt_image(tmp_path):
    kp = write_coco(tmp_path)
    bad = tmp_path / "train2014" / "COCO_train2014_000000000025.jpg"
    bad.write_bytes(b"this is not a jpeg at all" * 10)
    _expect_error(tmp_path, _coco_params(tmp_path, kp), str(bad), "cannot decode image")


def test_missing_image_file(tmp_path):
    kp = write_coco(tmp_path)
    gone = tmp_path / "val2014" / "COCO_val2014_000000000133.jpg"
    gone.unlink()
    _expect_error(tmp_path, _coco_params(tmp_path, kp), f"{gone}: image file not found")


def test_missing_key(tmp_path):
    kp = write_coco(tmp_path)
    data = json.loads(kp.read_text())
    del data["images"][3]["sentences"]
    kp.write_text(json.dumps(data))
    _expect_error(tmp_path, _coco_params(tmp_path, kp), f"{kp}: images[3] missing key 'sentences'")


def test_missing_raw_key(tmp_path):
    kp = write_coco(tmp_path)
    data = json.loads(kp.read_text())
    del data["images"][1]["sentences"][2]["raw"]
    kp.write_text(json.dumps(data))
    _expect_error(tmp_path, _coco_params(tmp_path, kp), f"{kp}: images[1].sentences[2] missing key 'raw'")


def test_empty_caption(tmp_path):
    kp = write_coco(tmp_path)
    data = json.loads(kp.read_text())
    data["images"][5]["sentences"][2]["raw"] = "   "
    kp.write_text(json.dumps(data))
    _expect_error(tmp_path, _coco_params(tmp_path, kp), f"{kp}: caption is empty (images[5].sentences[2])")


def test_invalid_utf8(tmp_path):
    kp = write_coco(tmp_path)
    raw = kp.read_bytes()
    pos = raw.index(b"Image 25 caption 1")
    kp.write_bytes(raw[:pos] + b"\xff\xfe" + raw[pos:])
    _expect_error(tmp_path, _coco_params(tmp_path, kp), f"{kp}: not valid UTF-8 at byte {pos}")


def test_invalid_json(tmp_path):
    kp = write_coco(tmp_path)
    kp.write_text(kp.read_text()[:-5])
    _expect_error(tmp_path, _coco_params(tmp_path, kp), f"{kp}: not valid JSON")


def test_vqa_annotation_missing_key(tmp_path):
    kp = write_coco(tmp_path)
    qf, af = write_vqa(tmp_path, [74])
    data = json.loads(af.read_text())
    del data["annotations"][1]["answers"]
    af.write_text(json.dumps(data))
    _expect_error(tmp_path, _coco_params(tmp_path, kp, vqa_questions=[str(qf)], vqa_annotations=[str(af)]),
                  f"{af}: annotations[1] missing key 'answers'")


def test_imagenet_folder_that_is_not_a_wnid(tmp_path):
    kp = write_coco(tmp_path)
    val = write_imagenet(tmp_path / "imagenet")
    (val / "cats").mkdir()
    _expect_error(tmp_path, _coco_params(tmp_path, kp, imagenet_val_root=str(val)),
                  f"{val / 'cats'}: folder name is not an ImageNet-1k WordNet id")


def test_skip_mode_skips_and_counts(tmp_path):
    kp = write_coco(tmp_path)
    qf, af = write_vqa(tmp_path, [74, 133])
    trunc = tmp_path / "val2014" / "COCO_val2014_000000000074.jpg"
    trunc.write_bytes(trunc.read_bytes()[:200])
    gone = tmp_path / "train2014" / "COCO_train2014_000000000009.jpg"
    gone.unlink()
    out = tmp_path / "out"
    info = build_dataset(_coco_params(tmp_path, kp, skip=True, vqa_questions=[str(qf)], vqa_annotations=[str(af)]),
                         out, progress=False)
    assert info["skipped"]["count"] == 2
    assert {(s["file"], s["problem"]) for s in info["skipped"]["items"]} == {
        (str(trunc), "cannot decode image (truncated)"), (str(gone), "image file not found")}
    assert read_info(out)["skipped"]["count"] == 2
    assert [r["image_id"] for r in ImageTextDataset(out, "train").manifest] == [25, 42]
    test = ImageTextDataset(out, "test")
    assert [r["image_id"] for r in test.manifest] == [133] and test.manifest[0]["index"] == 0
    assert [q["image_id"] for q in load_vqa(out, "test")[0]["questions"]] == [133, 133]


def test_paper_format_without_paths_names_the_key(tmp_path):
    with pytest.raises(ParamsError, match="key 'prepare.paper.karpathy_json' is empty"):
        build_dataset(paper_params("coco_karpathy"), tmp_path / "out", progress=False)
