"""The packaged photos written in the paper setting's public formats (COCO / Flickr30K Karpathy,
ImageNet val tree, VQAv2) go through the paper loaders unchanged: the data of the paper path's
smoke run (issue 16)."""

from __future__ import annotations

import json

import numpy as np

from cmapkd.data import ImageTextDataset, ZeroShotSet, load_vqa
from cmapkd.data.build import build_dataset
from cmapkd.sample_photos import PHOTOS, load_photo, write_public_formats
from data_fixtures import paper_params


def test_public_formats_load_through_the_paper_loaders(tmp_path):
    paths = write_public_formats(tmp_path / "raw", crops_per_photo=6, size=64)
    n = 6 * len(PHOTOS)
    coco = json.loads(paths["karpathy_json"].read_text())
    assert len(coco["images"]) == n and coco["images"][0]["sentences"][0]["raw"] == PHOTOS[0].captions[0]

    out = tmp_path / "processed" / "coco"
    params = paper_params("coco_karpathy", resolution=32, karpathy_json=str(paths["karpathy_json"]),
                          image_root=str(paths["image_root"]), imagenet_val_root=str(paths["imagenet_val_root"]),
                          vqa_questions=[str(paths["vqa_questions"])], vqa_annotations=[str(paths["vqa_annotations"])])
    info = build_dataset(params, out, progress=False)
    # crops 0, 1 (train) and 2 (restval -> train), 3 val, 4 and 5 test, for every photo
    assert info["counts"]["splits"] == {"train": 3 * len(PHOTOS), "val": len(PHOTOS), "test": 2 * len(PHOTOS)}
    test = ImageTextDataset(out, "test")
    assert test.captions[0] == list(PHOTOS[0].captions) and len(test.text_to_image()) == 5 * 2 * len(PHOTOS)
    # real photos: the stored crop of the cat is mostly orange-brown (red > blue), the astronaut's is not grey noise
    cat = np.asarray(ImageTextDataset(out, "train").images[3 * 2]).astype(float)  # photo 2 (chelsea), first crop
    assert cat[..., 0].mean() > cat[..., 2].mean() + 10
    # VQA: three questions per image follow it into its split
    qj, aj = load_vqa(out, "test")
    assert len(qj["questions"]) == 3 * 2 * len(PHOTOS)
    assert {a["answer_type"] for a in aj["annotations"]} == {"yes/no", "number", "other"}
    # ImageNet: one folder per photo with a class, 6 images each, named by open_clip's class names
    zs = ZeroShotSet(out, "imagenet")
    with_class = [p for p in PHOTOS if p.wnid is not None]
    assert len(zs.labels) == 6 * len(with_class)
    assert {zs.classnames[i] for i in zs.labels.tolist()} == {"suit", "espresso", "tabby cat", "missile", "Petri dish", "pinwheel"}

    flickr = build_dataset(paper_params("flickr30k_karpathy", resolution=32, karpathy_json=str(paths["flickr30k_json"]),
                                        image_root=str(paths["flickr30k_images"])), tmp_path / "processed" / "f30k",
                           progress=False)
    assert flickr["dataset"] == "flickr30k" and flickr["counts"]["splits"]["train"] == 3 * len(PHOTOS)


def test_photos_are_real_and_rgb():
    for p in PHOTOS:
        img = load_photo(p)
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8 and min(img.shape[:2]) >= 256
        assert img.std() > 20  # not a flat image
