"""Real photos that ship inside the scikit-image wheel (`skimage.data`, no download), with captions,
VQA questions and an ImageNet class written for each, and a writer that lays them out in the public
formats of the paper setting: a COCO Karpathy `dataset_coco.json` with `train2014/`, `val2014/`,
a Flickr30K Karpathy `dataset_flickr30k.json` with `flickr30k-images/`, an ImageNet val folder
tree (`<wnid>/ILSVRC2012_val_*.JPEG`) and VQAv2 question and annotation files.

They serve the paper path's CPU smoke run and the GPU check (issue 16): real images through the
paper setting's own loaders, not data for any result. (This module is outside `cmapkd.data` on
purpose: nothing the DVC stages depend on imports it.) Several random crops of each photo become
separate "images", so the splits have more than a handful of rows.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Photo:
    name: str  # the skimage.data function
    wnid: str | None  # ImageNet class of the photo (WordNet id); None: no class fits, left out of the tree
    captions: tuple[str, str, str, str, str]
    # (question, answer, answer_type, question_type) in VQAv2's vocabulary of answer types
    qa: tuple[tuple[str, str, str, str], ...]


PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "n04350905",  # suit
          ("An astronaut in a white space suit in front of an American flag.",
           "A smiling astronaut holding a helmet.", "A person in a space suit posing for a portrait.",
           "An astronaut with a flag and a space shuttle model behind her.", "A woman in a NASA space suit."),
          (("Is the person wearing a suit?", "yes", "yes/no", "is the"), ("How many people are there?", "1", "number", "how many"),
           ("What color is the suit?", "white", "other", "what color is the"))),
    Photo("coffee", "n07920052",  # espresso
          ("A cup of coffee with milk foam on a saucer.", "A white cup of cappuccino next to a spoon.",
           "Coffee in a cup seen from above.", "A hot drink on a saucer on a table.", "A cup of latte with a spoon."),
          (("Is there a spoon?", "yes", "yes/no", "is there a"), ("How many cups are there?", "1", "number", "how many"),
           ("What drink is this?", "coffee", "other", "what is"))),
    Photo("chelsea", "n02123045",  # tabby cat
          ("A tabby cat looking to the side.", "A striped cat with green eyes.", "Close up of an orange tabby cat.",
           "A cat sitting and staring at something.", "The face of a ginger cat."),
          (("Is this a dog?", "no", "yes/no", "is this a"), ("How many cats are there?", "1", "number", "how many"),
           ("What animal is this?", "cat", "other", "what animal is"))),
    Photo("rocket", "n04008634",  # projectile, missile
          ("A rocket on the launch pad under a blue sky.", "A space rocket standing on its pad.",
           "A tall rocket ready for launch.", "A rocket and its launch tower.", "A white rocket pointing at the sky."),
          (("Is the sky blue?", "yes", "yes/no", "is the"), ("How many rockets are there?", "1", "number", "how many"),
           ("What is on the launch pad?", "rocket", "other", "what is"))),
    Photo("hubble_deep_field", None,  # no ImageNet class shows deep space: not in the ImageNet tree
          ("Many small galaxies on a black sky.", "A deep field image of distant galaxies.",
           "Hundreds of galaxies seen by a space telescope.", "Colourful dots of light in dark space.",
           "A telescope photograph of the deep universe."),
          (("Is the background dark?", "yes", "yes/no", "is the"), ("How many suns are there?", "0", "number", "how many"),
           ("What is shown?", "galaxies", "other", "what is"))),
    Photo("immunohistochemistry", "n03920288",  # Petri dish (the nearest laboratory class)
          ("A microscope image of stained tissue.", "Cells stained blue and brown under a microscope.",
           "A tissue sample seen at high magnification.", "Stained cells in a laboratory slide.",
           "Brown and blue cells on a slide."),
          (("Is this a photo of a cat?", "no", "yes/no", "is this a"), ("How many slides are there?", "1", "number", "how many"),
           ("What color are the stains?", "brown", "other", "what color are the"))),
    Photo("colorwheel", "n03944341",  # pinwheel
          ("A colour wheel with every hue around a white centre.", "A circle of rainbow colours.",
           "A round chart of colours on a white background.", "All the hues of a colour wheel.",
           "A colourful disc fading to white in the middle."),
          (("Is it round?", "yes", "yes/no", "is it"), ("How many circles are there?", "1", "number", "how many"),
           ("What shape is it?", "circle", "other", "what shape is"))),
    Photo("retina", None,  # no ImageNet class: not in the ImageNet tree
          ("A photograph of the back of a human eye.", "A retina with red blood vessels.",
           "An orange retinal image with a bright spot.", "The fundus of an eye seen through a camera.",
           "Blood vessels spreading across a retina."),
          (("Is this an eye?", "yes", "yes/no", "is this an"), ("How many eyes are there?", "1", "number", "how many"),
           ("What color is the image?", "orange", "other", "what color is the"))),
)


def load_photo(photo: Photo) -> np.ndarray:
    """uint8 RGB [H, W, 3] of a packaged photo (grey and RGBA ones converted)."""
    import skimage.data

    img = getattr(skimage.data, photo.name)()
    return np.repeat(img[..., None], 3, -1) if img.ndim == 2 else np.ascontiguousarray(img[..., :3])


def random_crop(img: np.ndarray, rng: np.random.Generator, size: int, min_frac: float = 0.6) -> np.ndarray:
    """A random square crop (side min_frac..1 of the shorter side) resized to `size` (uint8 RGB)."""
    from PIL import Image

    h, w = img.shape[:2]
    side = int(min(h, w) * rng.uniform(min_frac, 1.0))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.BICUBIC)
    return np.asarray(crop)


def _jpeg(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def _sentence(raw: str, imgid: int, sentid: int) -> dict:
    return {"tokens": raw.lower().strip(".").replace(",", "").split(), "raw": raw, "imgid": imgid, "sentid": sentid}


def write_public_formats(root: str | Path, crops_per_photo: int = 6, size: int = 256, seed: int = 0,
                         splits: tuple[str, ...] = ("train", "train", "restval", "val", "test", "test")) -> dict[str, Path]:
    """Write every paper-setting input format under `root` from the packaged photos; returns the
    paths the `prepare.paper.*` params take. Crop k of every photo goes to split `splits[k %
    len(splits)]` (COCO: restval joins train under `restval_to_train`; Flickr30K has no restval,
    so it becomes train there). The ImageNet tree gets `crops_per_photo` images of each photo that
    has a class, VQAv2 the photo's three questions for every COCO image."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    coco, flickr, questions, annotations = [], [], [], []
    imagenet_val = root / "imagenet" / "val"
    n_val = 0
    for p, photo in enumerate(PHOTOS):
        img = load_photo(photo)
        for k in range(crops_per_photo):
            i = len(coco)
            split = splits[k % len(splits)]
            cocoid = 100000 + i
            folder = "train2014" if split == "train" else "val2014"
            fname = f"COCO_{folder}_{cocoid:012d}.jpg"
            _jpeg(root / "coco" / folder / fname, random_crop(img, rng, size))
            sents = [_sentence(c, i, 5 * i + j) for j, c in enumerate(photo.captions)]
            coco.append({"filepath": folder, "sentids": [s["sentid"] for s in sents], "filename": fname, "imgid": i,
                         "split": split, "sentences": sents, "cocoid": cocoid})
            ffile = f"{1000000 + i}.jpg"
            _jpeg(root / "flickr30k" / "flickr30k-images" / ffile, random_crop(img, rng, size))
            flickr.append({"sentids": [s["sentid"] for s in sents], "imgid": i, "sentences": sents,
                           "split": "train" if split == "restval" else split, "filename": ffile})
            for q, (question, answer, atype, qtype) in enumerate(photo.qa):
                qid = cocoid * 10 + q
                questions.append({"image_id": cocoid, "question": question, "question_id": qid})
                answers = [{"answer": answer, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)]
                annotations.append({"question_type": qtype, "multiple_choice_answer": answer, "answers": answers,
                                    "image_id": cocoid, "answer_type": atype, "question_id": qid})
            if photo.wnid is not None:
                n_val += 1
                _jpeg(imagenet_val / photo.wnid / f"ILSVRC2012_val_{n_val:08d}.JPEG", random_crop(img, rng, size))
    paths = {"karpathy_json": root / "coco" / "dataset_coco.json", "image_root": root / "coco",
             "flickr30k_json": root / "flickr30k" / "dataset_flickr30k.json",
             "flickr30k_images": root / "flickr30k" / "flickr30k-images", "imagenet_val_root": imagenet_val,
             "vqa_questions": root / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json",
             "vqa_annotations": root / "vqa" / "v2_mscoco_val2014_annotations.json"}
    paths["karpathy_json"].write_text(json.dumps({"images": coco, "dataset": "coco"}), encoding="utf-8")
    paths["flickr30k_json"].write_text(json.dumps({"images": flickr, "dataset": "flickr30k"}), encoding="utf-8")
    info = {"description": "Questions written for scikit-image's sample photos (CMAPKD smoke data), VQAv2 format.",
            "version": "2.0", "year": 2026}
    paths["vqa_questions"].parent.mkdir(parents=True, exist_ok=True)
    paths["vqa_questions"].write_text(json.dumps({"info": info, "task_type": "Open-Ended", "data_type": "mscoco",
                                                  "license": {}, "data_subtype": "val2014", "questions": questions}))
    paths["vqa_annotations"].write_text(json.dumps({"info": info, "license": {}, "data_subtype": "val2014",
                                                    "annotations": annotations, "data_type": "mscoco"}))
    return paths


__all__ = ["PHOTOS", "Photo", "load_photo", "random_crop", "write_public_formats"]
