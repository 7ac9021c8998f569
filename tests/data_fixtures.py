"""Shared helpers for the data tests: small typed params, without reading the project params.yaml."""

from __future__ import annotations

from dataclasses import dataclass, replace

from cmapkd.config import EmojiScenesParams, PaperDataParams, PrepareParams, SplitSizes

SMALL_EMOJI = EmojiScenesParams(
    vocab_size=45,
    splits=SplitSizes(train=48, val=16, test=40),
    max_objects=4,
    captions_per_image=5,
    vqa_per_image=6,
    small_px=(20, 24),
    medium_px=(34, 42),
    large_px=(64, 80),
    scene_mix={"simple": 0.25, "complex": 0.3, "fine-grained": 0.25, "abstract": 0.2},
    zeroshot_emoji=18,
    fashion_mnist=20,
    contact_sheet=8,
)
NO_PAPER = PaperDataParams(
    karpathy_json="", image_root="", restval_to_train=True, max_per_split=0,
    imagenet_val_root="", imagenet_per_class=0, imagenet_templates="openai", vqa_questions=[], vqa_annotations=[],
)


@dataclass(frozen=True)
class RunParams:
    """The part of `Params` that `build_dataset` reads."""

    seed: int
    setting: str
    prepare: PrepareParams


def emoji_params(seed: int = 0, **emoji_overrides) -> RunParams:
    prep = PrepareParams(
        format="emojiscenes", resolution=128, shard_size=32, skip_bad_images=False,
        emojiscenes=replace(SMALL_EMOJI, **emoji_overrides), paper=NO_PAPER,
    )
    return RunParams(seed=seed, setting="embedded", prepare=prep)


def paper_params(fmt: str, resolution: int = 32, skip: bool = False, **paper_overrides) -> RunParams:
    prep = PrepareParams(
        format=fmt, resolution=resolution, shard_size=2, skip_bad_images=skip,
        emojiscenes=SMALL_EMOJI, paper=replace(NO_PAPER, **paper_overrides),
    )
    return RunParams(seed=0, setting="paper", prepare=prep)
