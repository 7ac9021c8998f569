"""Thin DVC stage entry points (`cmapkd <name>` = `python -m cmapkd.stages.<name>`), one module per stage.

The registry below is what `cmapkd --help` lists and what `cmapkd <name>` runs.
"""

from __future__ import annotations

# name -> (module, one-line description); in pipeline order
STAGES: dict[str, tuple[str, str]] = {
    "params": ("cmapkd.stages.params", "validate params.yaml against the typed schema and print it resolved"),
    "prepare": ("cmapkd.stages.prepare", "build the datasets (EmojiScenes, or COCO/Flickr30K/ImageNet/VQAv2 from local paths) as shards"),
    "teacher": ("cmapkd.stages.teacher", "train the embedded teacher's heads on frozen towers, or record the paper's ViT-L-14"),
    "cache_teacher": ("cmapkd.stages.cache_teacher", "cache frozen teacher targets for K seeded views of every training image and caption"),
    "distill": ("cmapkd.stages.distill", "train: a CMAPKD stage (stage1-4b), a baseline (scratch, kd, ...) or an ablation chain"),
    "evaluate": ("cmapkd.stages.evaluate", "retrieval, zero-shot classification, VQA probe, efficiency and figure arrays of one model"),
    "tables": ("cmapkd.stages.tables", "Tables 2-5 (Markdown, LaTeX, CSV) from the saved metrics JSONs: mean +- std over seeds"),
    "figures": ("cmapkd.stages.figures", "Figures 3-6 (PNG, PDF) from the saved figdata arrays and the test images"),
}

