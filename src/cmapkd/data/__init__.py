"""Datasets: the EmojiScenes default benchmark and loaders for the paper's public datasets.

Readers (used by every later stage):
    ImageTextDataset(root, split), ZeroShotSet(root, name), load_vqa(root, split), read_info(root)
Builder (the `prepare` stage): build_dataset(params, out_dir)
Errors: DataError (a ValueError whose message starts with the offending file)
"""

from cmapkd.data.errors import DataError
from cmapkd.data.readers import ImageTextDataset, ShardedImages, ZeroShotSet, load_vqa, read_info, zeroshot_names

__all__ = [
    "DataError",
    "ImageTextDataset",
    "ShardedImages",
    "ZeroShotSet",
    "build_dataset",
    "load_vqa",
    "read_info",
    "zeroshot_names",
]


def __getattr__(name: str):  # lazy: the builder pulls in PIL, fonts and the config schema
    if name == "build_dataset":
        from cmapkd.data.build import build_dataset

        return build_dataset
    raise AttributeError(f"module 'cmapkd.data' has no attribute {name!r}")
