"""Tables 2-7 of the paper (METHOD.md section 7) from the metrics JSONs of the `evaluate` stage.

Input: `reports/metrics/<model_id>.json`, one flat JSON per trained model (keys: `METRIC_KEYS`;
schema in docs/reports.md), and for Tables 6-7 (retrieval by scene type and object size) the
per-query ranks `reports/ranks/<model_id>.npz` and the test manifest. Output:
`table{2,...,7}.{md,tex,csv}` (`TABLE_FILES`).

- A model id `<group>-s<seed>` is one seed of `<group>`; the rows aggregate the seeds that exist:
  mean and sample std (ddof=1) over seeds, with n shown on every row (n = 1: no std).
- Rows whose files are missing (e.g. a quick profile with fewer seeds or no ablations) are left
  out; a table with no rows says so. Files of unknown groups are reported and ignored.
- Percentages with one decimal. The best student per column is bold (ties all bold; no bold when
  every student ties); the teacher is a reference row in its own block and never bold.
- Adapted baselines (PromptKD, C2KD, LLaVA-KD) are named as adaptations in every table.
- No number is typed in: every value comes from the JSONs. Output is deterministic (sorted inputs,
  fixed formats), so a rerun on the same files writes identical bytes.
- LaTeX tables need `\\usepackage{booktabs}` and `\\usepackage{adjustbox}`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np

log = logging.getLogger("cmapkd.report.tables")

# --------------------------------------------------------------------------------------------
# Input schema
# --------------------------------------------------------------------------------------------

RETRIEVAL_KEYS = (
    "retrieval_i2t_r1", "retrieval_i2t_r5", "retrieval_i2t_r10",
    "retrieval_t2i_r1", "retrieval_t2i_r5", "retrieval_t2i_r10", "retrieval_mean",
)
VQA_KEYS = ("vqa_probe_overall", "vqa_probe_yes_no", "vqa_probe_number", "vqa_probe_other")
# fractions in [0, 1], shown as percentages (plus the zero-shot keys of the sets the files have)
FRACTION_KEYS = RETRIEVAL_KEYS + VQA_KEYS
# zero-shot sets are read from the files (`evaluate.zeroshot`): zeroshot_<set>_<ZEROSHOT_METRICS>
ZEROSHOT_METRICS = ("top1", "top5", "mean_per_class_recall")
_ZEROSHOT_KEY = re.compile(r"^zeroshot_(?P<set>.+)_(?P<metric>top1|top5|mean_per_class_recall)$")
# known sets: display name, description for the caption; listed first, in this order
ZEROSHOT_SETS: dict[str, tuple[str, str]] = {
    "emoji_groups": ("EmojiScenes groups", "single-object EmojiScenes images labelled by Unicode emoji group (in domain)"),
    "emoji_subgroups": ("EmojiScenes subgroups", "single-object EmojiScenes images labelled by Unicode emoji subgroup (in domain)"),
    "fashion_mnist": ("Fashion-MNIST", "a class-balanced subset of its test set (out of domain)"),
    "imagenet": ("ImageNet-1k", "the validation set, {imagenet_templates}"),
}
# prepare.paper.imagenet_templates -> what the ImageNet caption says
IMAGENET_TEMPLATES = {"openai": "CLIP's 80 prompt templates", "simple": "open_clip's 7 simple prompt templates"}
EFFICIENCY_KEYS = (
    "params_image", "params_text", "params_total", "flops_per_image", "flops_per_caption",
    "latency_ms_image_b1", "latency_ms_image_b32", "latency_ms_text_b1", "latency_ms_text_b32",
    "throughput_images_per_s",
)
# required in every file; `latency_threads` (int) and `vqa_probe_split` (str) are used when present
METRIC_KEYS = ("model", "method", "seed", *FRACTION_KEYS, *EFFICIENCY_KEYS, "device")

# display names; the adapted baselines carry "(adapted)" everywhere (METHOD.md section 8)
TEACHER = "teacher"
HEADLINE: tuple[tuple[str, str], ...] = (
    ("scratch", "Scratch"),
    ("kd", "KD (Hinton)"),
    ("fitnet", "FitNet"),
    ("clipkd", "CLIP-KD"),
    ("promptkd", "PromptKD (adapted)"),
    ("c2kd", "C2KD (adapted)"),
    ("llavakd", "LLaVA-KD (adapted)"),
    ("cmapkd", "CMAPKD (ours)"),
)
PROGRESSIVE: tuple[tuple[str, str], ...] = (
    ("cmapkd-stage1", "CMAPKD after stage 1 (P5 / L4)"),
    ("cmapkd-stage2", "CMAPKD after stage 2 (P4-P5 / L3-L4)"),
    ("cmapkd-stage3", "CMAPKD after stage 3 (P2-P5 / L1-L4, uniform)"),
)
ABLATIONS: tuple[tuple[str, str], ...] = (
    ("abl-p5only", "w/o visual pyramid (P5 only)"),
    ("abl-l4only", "w/o language hierarchy (L4 only)"),
    ("abl-uniform", "w/o ALSN (uniform weights)"),
    ("abl-manual", "w/o ALSN (manual weights)"),
    ("abl-noalign", "w/o cross-modal alignment"),
    ("abl-norelation", "w/o relational distillation"),
    ("abl-onestage", "one-stage training (not progressive)"),
)
# reference rows, never trained by a method: the student as every run starts (student_init stage) and
# the student architecture with random weights (what the probes reach on features that carry nothing)
INIT, RANDOM = "student_init", "random"  # model ids: the student_init folder's name, and `--model random`
REFERENCES: tuple[tuple[str, str], ...] = (
    (INIT, "Student at start (pretrained towers, aligned heads; no training)"),
    (RANDOM, "Student with random weights"),
)
SCRATCH = "scratch"
KNOWN_GROUPS = {TEACHER, *(g for g, _ in REFERENCES + HEADLINE + PROGRESSIVE + ABLATIONS)}

DATASET_NAMES = {
    "emojiscenes": "EmojiScenes",
    "coco_karpathy": "COCO (Karpathy test split)",
    "flickr30k_karpathy": "Flickr30K (Karpathy test split)",
}

TABLE_IDS = (2, 3, 4, 5, 6, 7)
TABLE_FILES = tuple(f"table{i}.{ext}" for i in TABLE_IDS for ext in ("md", "tex", "csv"))

_SEED_SUFFIX = re.compile(r"^(?P<group>.+)-s(?P<seed>\d+)$")
_STAGE_MODEL = re.compile(r"^cmapkd-(?P<stage>stage[1-3])-s\d+$")


class ReportError(ValueError):
    """A metrics or figdata file is missing, malformed or inconsistent (the message names it)."""


@dataclass(frozen=True)
class Run:
    """One metrics JSON: one model (one seed of a group)."""

    path: Path
    model: str
    group: str
    seed: int
    metrics: dict

    @property
    def zeroshot_sets(self) -> set[str]:
        return {m["set"] for k in self.metrics if (m := _ZEROSHOT_KEY.match(k))}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_run(path: str | Path) -> Run:
    """Read and check one metrics JSON; a `ReportError` names the file and the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise ReportError(f"{path}: not UTF-8 text ({e})") from e
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object of metrics, got {type(data).__name__}")
    missing = [k for k in METRIC_KEYS if k not in data]
    if missing:
        raise ReportError(f"{path}: missing key(s) {', '.join(missing)}")
    model = data["model"]
    if model != path.stem:
        raise ReportError(f"{path}: key 'model' is {model!r}, expected the file's name {path.stem!r}")
    seed = data["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ReportError(f"{path}: key 'seed' must be an integer, got {seed!r}")
    zs_keys = sorted(k for k in data if _ZEROSHOT_KEY.match(k))
    for k in (*FRACTION_KEYS, *zs_keys, *EFFICIENCY_KEYS):
        v = data[k]
        if not _is_number(v):
            raise ReportError(f"{path}: key '{k}' must be a finite number, got {v!r}")
        if k not in EFFICIENCY_KEYS and not 0.0 <= v <= 1.0:
            raise ReportError(f"{path}: key '{k}' = {v!r} is not a fraction in [0, 1]")
    if not isinstance(data["device"], str):
        raise ReportError(f"{path}: key 'device' must be a string, got {data['device']!r}")
    m = _SEED_SUFFIX.match(model)
    group = m["group"] if m else model
    if m and int(m["seed"]) != seed:
        raise ReportError(f"{path}: model id {model!r} names seed {m['seed']} but key 'seed' is {seed}")
    return Run(path=path, model=model, group=group, seed=seed, metrics=data)


def check_zeroshot_sets(runs: list[Run]) -> None:
    """Every model must have been evaluated on the same zero-shot sets."""
    sets = sorted(set().union(*(r.zeroshot_sets for r in runs)))
    for r in runs:
        missing = [f"zeroshot_{s}_{m}" for s in sets for m in ZEROSHOT_METRICS if f"zeroshot_{s}_{m}" not in r.metrics]
        if missing:
            raise ReportError(f"{r.path}: missing key(s) {', '.join(missing)} (other files have these zero-shot sets)")


def load_runs(metrics_dir: str | Path, check_sets: bool = True) -> list[Run]:
    """Every `*.json` in `metrics_dir`, sorted by file name; duplicate (group, seed) is an error.
    `check_sets`: also require the same zero-shot sets in every file (`check_zeroshot_sets`;
    write_tables checks after leaving out the files the current params do not list)."""
    d = Path(metrics_dir)
    if not d.is_dir():
        raise ReportError(f"{d}: metrics folder not found (run the evaluate stage first)")
    runs = [read_run(p) for p in sorted(d.glob("*.json"))]
    if not runs:
        raise ReportError(f"{d}: no metrics JSON files (run the evaluate stage first)")
    if check_sets:
        check_zeroshot_sets(runs)
    seen: dict[tuple[str, int], Path] = {}
    for r in runs:
        key = (r.group, r.seed)
        if key in seen:
            raise ReportError(f"{r.path}: seed {r.seed} of '{r.group}' is also in {seen[key]}")
        seen[key] = r.path
    return runs


# --------------------------------------------------------------------------------------------
# Aggregation over seeds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One table row: a group of runs (seeds) aggregated."""

    group: str
    name: str
    role: Literal["teacher", "reference", "student"]
    seeds: tuple[int, ...]
    mean: dict[str, float]
    std: dict[str, float | None]  # None when n == 1
    devices: tuple[str, ...]
    vqa_splits: tuple[str, ...] = ()
    delta: object = None  # cmapkd.report.stats.Delta of retrieval_mean vs Scratch (Table 2), or None

    @property
    def n(self) -> int:
        return len(self.seeds)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)


def _device(m: dict) -> str:
    t = m.get("latency_threads")
    return f"{m['device']} ({t} threads)" if isinstance(t, int) and not isinstance(t, bool) else str(m["device"])


def zeroshot_sets(runs: list[Run]) -> list[str]:
    """The zero-shot sets of the files: the known ones in `ZEROSHOT_SETS` order, then the rest sorted."""
    found = set().union(*(r.zeroshot_sets for r in runs)) if runs else set()
    return [s for s in ZEROSHOT_SETS if s in found] + sorted(found - set(ZEROSHOT_SETS))


def aggregate(runs: list[Run], group: str, name: str) -> Row | None:
    """The row of `group` (None when no run of it exists): mean and std (ddof=1) over seeds."""
    mine = sorted((r for r in runs if r.group == group), key=lambda r: r.seed)
    if not mine:
        return None
    mean: dict[str, float] = {}
    std: dict[str, float | None] = {}
    for k in (*FRACTION_KEYS, *sorted(k for k in mine[0].metrics if _ZEROSHOT_KEY.match(k)), *EFFICIENCY_KEYS):
        mean[k], std[k] = _mean_std([float(r.metrics[k]) for r in mine])
    return Row(
        group=group,
        name=name,
        role="teacher" if group == TEACHER else "reference" if group in (INIT, RANDOM) else "student",
        seeds=tuple(r.seed for r in mine),
        mean=mean,
        std=std,
        devices=tuple(sorted({_device(r.metrics) for r in mine})),
        vqa_splits=tuple(sorted({str(r.metrics["vqa_probe_split"]) for r in mine if "vqa_probe_split" in r.metrics})),
    )


# --------------------------------------------------------------------------------------------
# Columns and cells
# --------------------------------------------------------------------------------------------

Kind = Literal["pct", "count_m", "flops", "ms", "rate", "reduction", "speedup", "delta"]


@dataclass(frozen=True)
class Col:
    """One numeric column. `key` is a metric key, or a derived value for kind reduction/speedup.
    Headers use the markers of `_render`: '->' is an arrow, '+-' is plus-minus."""

    id: str  # CSV column name
    key: str
    header: str
    kind: Kind
    better: Literal["max", "min"] | None
    group: str = ""  # LaTeX header group (one \multicolumn over consecutive columns)
    md: str = ""  # Markdown/CSV header when not "<group> <header>"


@dataclass(frozen=True)
class Cell:
    mean: float | None  # in display units (percent, millions, ...); None = not available
    std: float | None
    ci: tuple[float, float] | None = None  # kind delta: the 95 % interval, display units


@dataclass(frozen=True)
class Table:
    number: int
    label: str
    caption: str  # with _render markers
    columns: tuple[Col, ...]
    blocks: tuple[tuple[Row, ...], ...]  # separated by a midrule; the teacher block first
    empty_note: str  # shown when there are no rows at all
    flops_unit: dict[str, str]  # column id -> "G" | "M" for flops columns


_DECIMALS = {"pct": 1, "count_m": 2, "flops": 2, "ms": 2, "rate": 0, "reduction": 1, "speedup": 2, "delta": 1}
_SHOW_STD = {"pct", "ms", "rate"}  # params and FLOPs are the same for every seed of a model


def _flops_scale(unit: str) -> float:
    return 1e9 if unit == "G" else 1e6


def _cell(row: Row, col: Col, teacher: Row | None, flops_unit: dict[str, str]) -> Cell:
    std = row.std.get(col.key) if col.kind in _SHOW_STD else None
    if col.kind == "delta":  # points of mean recall vs Scratch, with the paired bootstrap interval
        d = row.delta.get(col.key) if isinstance(row.delta, dict) else row.delta  # Table 7: one per column
        return Cell(None, None) if d is None else Cell(d.diff * 100.0, None, (d.lo * 100.0, d.hi * 100.0))
    if col.kind == "pct":
        return Cell(row.mean[col.key] * 100.0, None if std is None else std * 100.0)
    if col.kind == "count_m":
        return Cell(row.mean[col.key] / 1e6, None)
    if col.kind == "flops":
        return Cell(row.mean[col.key] / _flops_scale(flops_unit[col.id]), None)
    if col.kind in ("ms", "rate"):
        return Cell(row.mean[col.key], std)
    if col.kind == "reduction":  # params reduction vs the teacher, in percent
        if teacher is None or row.role != "student" or teacher.mean[col.key] <= 0:
            return Cell(None, None)
        return Cell(100.0 * (1.0 - row.mean[col.key] / teacher.mean[col.key]), None)
    if col.kind == "speedup":  # teacher latency / this latency
        if teacher is None or row.role != "student" or row.mean[col.key] <= 0:
            return Cell(None, None)
        return Cell(teacher.mean[col.key] / row.mean[col.key], None)
    raise AssertionError(col.kind)


def _fmt(x: float, kind: Kind) -> str:
    s = f"{x:.{_DECIMALS[kind]}f}"
    return "0" + s[2:] if s.startswith("-0") and float(s) == 0 else s  # no "-0.0"


def _bold_rows(table: Table, j: int, cells: dict[tuple[int, int], Cell]) -> set[int]:
    """Indices (into the flat row list) of the best student rows of column j, by displayed value."""
    col = table.columns[j]
    if col.better is None:
        return set()
    flat = [r for b in table.blocks for r in b]
    vals = {
        i: float(_fmt(cells[(i, j)].mean, col.kind))
        for i, r in enumerate(flat)
        if r.role == "student" and cells[(i, j)].mean is not None
    }
    if not vals:
        return set()
    best = max(vals.values()) if col.better == "max" else min(vals.values())
    winners = {i for i, v in vals.items() if v == best}
    if len(winners) == len(vals) and len(vals) > 1:  # every student ties: nothing stands out
        return set()
    return winners


# --------------------------------------------------------------------------------------------
# The four tables
# --------------------------------------------------------------------------------------------


def _pct(id_: str, key: str, header: str, group: str = "") -> Col:
    return Col(id=f"{id_}_pct", key=key, header=header, kind="pct", better="max", group=group)


def _seed_note() -> str:
    return (
        "Mean +- sample std (ddof=1) over the n training seeds of each row (n = 1: a single run, "
        "no std). The best student per column is in bold; the teacher (top block) is a reference "
        "and is never bold. PromptKD, C2KD and LLaVA-KD are adaptations to CLIP-to-CLIP "
        "distillation, marked (adapted) (README)."
    )


def build_tables(runs: list[Run], headline_metric: str = "retrieval_mean", dataset: str = "emojiscenes",
                 deltas: dict | None = None, imagenet_templates: str = "openai") -> list[Table]:
    """Tables 2-5 from the loaded runs (rows whose runs are missing are left out). `deltas`: group ->
    `stats.Delta` of its mean recall vs Scratch; Table 2 gets that column when given.
    `imagenet_templates`: prepare.paper.imagenet_templates, named in the caption."""
    import dataclasses
    zs = zeroshot_sets(runs)
    fractions = [*FRACTION_KEYS, *(f"zeroshot_{s}_{m}" for s in zs for m in ZEROSHOT_METRICS)]
    if headline_metric not in fractions:
        raise ReportError(
            f"report.headline_metric: {headline_metric!r} is not a fraction metric of the files; one of {', '.join(fractions)}"
        )
    ds = DATASET_NAMES.get(dataset, dataset)
    teacher = aggregate(runs, TEACHER, "Teacher")
    init = aggregate(runs, INIT, REFERENCES[0][1])
    random_ = aggregate(runs, RANDOM, REFERENCES[1][1])
    heads = tuple(r for g, n in HEADLINE if (r := aggregate(runs, g, n)) is not None)
    heads_delta = tuple(dataclasses.replace(r, delta=(deltas or {}).get(r.group)) for r in heads)
    prog = tuple(r for g, n in PROGRESSIVE if (r := aggregate(runs, g, n)) is not None)
    abls = tuple(r for g, n in ABLATIONS if (r := aggregate(runs, g, n)) is not None)
    cmapkd = tuple(r for r in heads if r.group == "cmapkd")
    tblock = (teacher,) if teacher is not None else ()
    refs = tuple(r for r in (teacher, init) if r is not None)
    main_blocks = tuple(b for b in (refs, heads) if b)

    templates = IMAGENET_TEMPLATES[imagenet_templates]
    zs_note = "".join(f"{_zs_name(s)}: {ZEROSHOT_SETS[s][1].format(imagenet_templates=templates) if s in ZEROSHOT_SETS else 'zero-shot set ' + s}. "
                      for s in zs)
    splits = sorted({s for b in main_blocks for r in b for s in r.vqa_splits})
    vqa_split = f"{' and '.join(splits)} split" if splits else "held-out split"
    retrieval_protocol = (
        f"Protocol: every image and every caption of the {ds} test split is embedded; a text->image "
        "query is a hit at k if its image is in the top k, an image->text query if any of the "
        "image's captions is (all captions of an image count; the CLIP_benchmark protocol)."
    )
    t2 = Table(
        number=2,
        label="tab:retrieval",
        caption=(
            f"Image-text retrieval, Recall@k (%) on the {ds} test split. {retrieval_protocol} "
            f"Mean: average of the six recalls. {_seed_note()}"
            + (" Delta vs Scratch: mean recall minus Scratch's (points), seeds pooled, with a 95 % "
               "paired bootstrap interval over test images (each with its captions; 2000 resamples); "
               "an interval that contains 0 is no difference at this test-set size." if deltas else "")
        ),
        columns=(
            _pct("i2t_r1", "retrieval_i2t_r1", "R@1", "Image->Text"),
            _pct("i2t_r5", "retrieval_i2t_r5", "R@5", "Image->Text"),
            _pct("i2t_r10", "retrieval_i2t_r10", "R@10", "Image->Text"),
            _pct("t2i_r1", "retrieval_t2i_r1", "R@1", "Text->Image"),
            _pct("t2i_r5", "retrieval_t2i_r5", "R@5", "Text->Image"),
            _pct("t2i_r10", "retrieval_t2i_r10", "R@10", "Text->Image"),
            _pct("mean", "retrieval_mean", "Mean"),
            *((Col("delta_mean", "retrieval_mean", "Delta vs Scratch [95% CI]", "delta", None),) if deltas else ()),
        ),
        blocks=tuple(b for b in (refs, heads_delta) if b),
        empty_note="no metrics of the teacher or the headline models",
        flops_unit={},
    )
    t3 = Table(
        number=3,
        label="tab:zeroshot-vqa",
        caption=(
            "Zero-shot classification and VQA probe accuracy (%). Zero-shot: no training on the "
            "labels; each class is a prompt-ensembled text embedding, and an image gets the class "
            f"of highest cosine similarity. {zs_note}VQA is a probe, not zero-shot: a small MLP answer "
            "head is trained on the frozen image and question embeddings of the train split with the "
            "same recipe for every model and scored with the VQAv2 accuracy on the questions of the "
            f"{vqa_split} (overall and by answer type). The random-weight student (reference) shows "
            f"what the probe and zero-shot reach on features that carry no training. {_seed_note()}"
        ),
        columns=(
            *(
                _pct(f"zs_{s}_{m}", f"zeroshot_{s}_{m}", head, _zs_name(s))
                for s in zs
                for m, head in (("top1", "Top-1"), ("top5", "Top-5"))
            ),
            _pct("vqa_overall", "vqa_probe_overall", "Overall", "VQA probe"),
            _pct("vqa_yes_no", "vqa_probe_yes_no", "Yes/No", "VQA probe"),
            _pct("vqa_number", "vqa_probe_number", "Number", "VQA probe"),
            _pct("vqa_other", "vqa_probe_other", "Other", "VQA probe"),
        ),
        blocks=tuple(b for b in (refs + ((random_,) if random_ is not None else ()), heads) if b),
        empty_note="no metrics of the teacher or the headline models",
        flops_unit={},
    )
    t4 = Table(
        number=4,
        label="tab:ablations",
        caption=(
            "Ablations of CMAPKD and its progressive stages: retrieval Recall@1 and mean recall (%) on "
            f"the {ds} test split (all captions of an image count) and VQA probe accuracy (%, a "
            "probe on frozen embeddings, not zero-shot). Top block: the full method (progressive "
            "stages 1-4 with the ALSN and every loss term); middle: the same run after stages 1-3; "
            "bottom: one component removed or changed each. The full method's std over its n seeds "
            "shows the seed-to-seed noise against which single-seed ablations are read. "
            "Mean +- sample std (ddof=1) where n > 1. The best row per column is in bold."
        ),
        columns=(
            _pct("i2t_r1", "retrieval_i2t_r1", "I->T R@1", "Retrieval"),
            _pct("t2i_r1", "retrieval_t2i_r1", "T->I R@1", "Retrieval"),
            _pct("mean", "retrieval_mean", "Mean R", "Retrieval"),
            _pct("vqa_overall", "vqa_probe_overall", "VQA probe"),
        ),
        blocks=tuple(b for b in (cmapkd, prog, abls) if b),
        empty_note="no metrics of CMAPKD, its stages or its ablations",
        flops_unit={},
    )
    eff_rows = [r for b in main_blocks for r in b]
    flops_unit = {
        cid: ("G" if eff_rows and max(r.mean[key] for r in eff_rows) >= 1e9 else "M")
        for cid, key in (("flops_image", "flops_per_image"), ("flops_caption", "flops_per_caption"))
    }
    devices = sorted({d for r in eff_rows for d in r.devices})
    head_label = _metric_label(headline_metric)
    t5 = Table(
        number=5,
        label="tab:efficiency",
        caption=(
            "Efficiency of the teacher and the students. Params: image + text towers. FLOPs per image "
            "and per caption (2 FLOPs per multiply-add, torch FlopCounterMode). Latency: median ms "
            "per call at batch size 1, image and text tower, measured on "
            f"{', '.join(devices) if devices else 'the evaluation device'}; throughput in images/s. "
            f"{head_label} (%) on the {ds} test split (all captions of an image count). Params "
            "reduction and speed-up (image latency at batch 1) are relative to the teacher. Latency "
            "and throughput: mean +- sample std over the n seeds where n > 1. The best student per "
            "column is in bold (none when all students tie); the teacher is never bold."
        ),
        columns=(
            Col("params_total_m", "params_total", "Params (M)", "count_m", "min"),
            Col("flops_image", "flops_per_image", f"image ({flops_unit['flops_image']})", "flops", "min", "FLOPs",
                md=f"{flops_unit['flops_image']}FLOPs / image"),
            Col("flops_caption", "flops_per_caption", f"caption ({flops_unit['flops_caption']})", "flops", "min", "FLOPs",
                md=f"{flops_unit['flops_caption']}FLOPs / caption"),
            Col("latency_image_b1_ms", "latency_ms_image_b1", "image", "ms", "min", "Latency b1 (ms)",
                md="Image latency, batch 1 (ms)"),
            Col("latency_text_b1_ms", "latency_ms_text_b1", "text", "ms", "min", "Latency b1 (ms)",
                md="Text latency, batch 1 (ms)"),
            Col("throughput_images_per_s", "throughput_images_per_s", "Images/s", "rate", "max"),
            Col(f"{headline_metric}_pct", headline_metric, f"{head_label} (%)", "pct", "max"),
            Col("params_reduction_pct", "params_total", "params red. (%)", "reduction", "max", "vs teacher",
                md="Params reduction vs teacher (%)"),
            Col("speedup_x", "latency_ms_image_b1", "speed-up", "speedup", "max", "vs teacher", md="Speed-up vs teacher"),
        ),
        blocks=main_blocks,
        empty_note="no metrics of the teacher or the headline models",
        flops_unit=flops_unit,
    )
    return [t2, t3, t4, t5]


# --------------------------------------------------------------------------------------------
# Tables 6-7: retrieval by scene type and by the size of a scene's smallest object (EmojiScenes)
# --------------------------------------------------------------------------------------------

SCENE_TYPES = ("simple", "complex", "fine-grained", "abstract")  # cmapkd.data.scenes (not imported: no torch here)
OBJECT_SIZES = ("small", "medium", "large")


def test_subsets(manifest: str | Path) -> dict[str, np.ndarray] | None:
    """Subset name -> boolean mask over the test images (manifest order = the ranks' order): `all`,
    each scene type, and `smallest_<size>` (the scene's smallest object). None when the manifest
    has no scene types (the paper's datasets): the breakdown is then skipped, not faked."""
    path = Path(manifest)
    if not path.is_file():
        raise ReportError(f"{path}: test manifest not found (the prepare stage writes it)")
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON lines: {e}") from e
    if not rows or any("scene_type" not in r for r in rows):
        return None
    out = {"all": np.ones(len(rows), dtype=bool)}
    for t in SCENE_TYPES:
        out[t] = np.array([r["scene_type"] == t for r in rows])
    try:
        smallest = [min(OBJECT_SIZES.index(o["size"]) for o in r["objects"]) for r in rows]
    except (KeyError, ValueError) as e:
        raise ReportError(f"{path}: every scene needs objects with a size in {OBJECT_SIZES} ({e})") from e
    for i, size in enumerate(OBJECT_SIZES):
        out[f"smallest_{size}"] = np.array([m == i for m in smallest])
    return {k: v for k, v in out.items() if v.any()}


_SUBSET_HEADERS = {"all": "All", **{t: t.capitalize() for t in SCENE_TYPES},
                   **{f"smallest_{s}": s.capitalize() for s in OBJECT_SIZES}}


def build_subset_tables(runs: list[Run], ranks_dir: str | Path | None, subsets: dict[str, np.ndarray] | None,
                        dataset: str = "emojiscenes", why: str | None = None) -> list[Table]:
    """Table 6: mean recall (%) per test subset of the teacher, the student at start, Scratch, the
    best baseline (highest Table 2 mean recall), CMAPKD and its ablations, mean +- std over seeds.
    Table 7: CMAPKD minus w/o visual pyramid, the best baseline and Scratch per subset, seeds
    pooled, with paired bootstrap intervals. Without subsets both are empty and say `why` (default:
    the data has no scene types)."""
    from cmapkd.report.stats import RanksError, mean_recall, paired_delta, read_ranks

    ds = DATASET_NAMES.get(dataset, dataset)
    subsets = subsets or {}

    def ranks_of(group: str) -> list:
        mine = sorted((r for r in runs if r.group == group), key=lambda r: r.seed)
        try:
            return [(r.seed, read_ranks(Path(ranks_dir) / f"{r.model}.npz")) for r in mine]
        except RanksError as e:
            raise ReportError(str(e)) from e

    n_images = next(iter(subsets.values())).shape[0] if subsets else 0

    def subset_row(group: str, name: str) -> Row | None:
        seeded = ranks_of(group)
        if not seeded:
            return None
        mean, std = {}, {}
        for key, mask in subsets.items():
            vals = []
            for _, rk in seeded:
                if rk.i2t.shape[0] != n_images:
                    raise ReportError(f"{ranks_dir}/{group}: ranks of {rk.i2t.shape[0]} test images, the test manifest has {n_images}")
                vals.append(mean_recall([rk], images=mask))
            mean[key], std[key] = _mean_std(vals)
        role = "teacher" if group == TEACHER else "reference" if group in (INIT, RANDOM) else "student"
        return Row(group=group, name=name, role=role, seeds=tuple(s for s, _ in seeded), mean=mean, std=std, devices=())

    names = dict(HEADLINE + ABLATIONS + REFERENCES)
    names[TEACHER] = "Teacher"
    baselines = [g for g, _ in HEADLINE if g not in (SCRATCH, "cmapkd") and any(r.group == g for r in runs)]
    best = max(baselines, key=lambda g: aggregate(runs, g, g).mean["retrieval_mean"], default=None)
    columns = tuple(
        Col(f"{k.replace('-', '_')}_pct", k, f"{_SUBSET_HEADERS[k]} ({int(m.sum())})", "pct", "max",
            "" if k == "all" else "Scene type" if k in SCENE_TYPES else "Smallest object")
        for k, m in subsets.items()
    )
    if subsets:
        refs = tuple(r for g in (TEACHER, INIT) if (r := subset_row(g, names[g])) is not None)
        heads = tuple(r for g in (SCRATCH, best, "cmapkd") if g and (r := subset_row(g, names[g] + (" (best baseline)" if g == best else ""))) is not None)
        abls = tuple(r for g, n in ABLATIONS if (r := subset_row(g, n)) is not None)
        blocks6 = tuple(b for b in (refs, heads, abls) if b)
    else:
        blocks6 = ()
    why = why or (f"the {ds} test split has no scene types or object sizes: the breakdown is skipped"
                  if not subsets else "no ranks of these models")
    subset_note = (
        "Columns: all test images, each scene type, and the size class of the scene's smallest object "
        "(EmojiScenes: small 20-24 px, medium 34-42 px, large 64-80 px on the 128 px canvas); the "
        "number of test images in each is in the header. An image counts with its image->text query "
        "and its captions' text->image queries; the gallery is always the whole test split."
    )
    t6 = Table(
        number=6,
        label="tab:by-scene",
        caption=(
            f"Retrieval mean recall (%, the mean of the six recalls) on the {ds} test split by scene type "
            f"and by object size. {subset_note} Mean +- sample std (ddof=1) over the n training seeds "
            "of each row (ablations: one seed; read them against the std of CMAPKD's row). The best "
            "student per column is in bold; the teacher and the student at start are references."
        ),
        columns=columns,
        blocks=blocks6,
        empty_note=why,
        flops_unit={},
    )
    comparisons = [("abl-p5only", "w/o visual pyramid (P5 only)"), (best, f"{names.get(best, best)} (best baseline)"),
                   (SCRATCH, "Scratch")]
    rows7 = []
    mine = [rk for _, rk in ranks_of("cmapkd")] if subsets else []
    for group, label in comparisons:
        other = [rk for _, rk in ranks_of(group)] if group and mine else []
        if not other:
            continue
        try:
            deltas = {k: paired_delta(mine, other, images=m) for k, m in subsets.items()}
        except RanksError as e:
            raise ReportError(f"{ranks_dir}: cmapkd vs {group}: {e}") from e
        rows7.append(Row(group=f"cmapkd-vs-{group}", name=f"CMAPKD (ours) - {label}", role="student",
                         seeds=tuple(r.seed for r in runs if r.group == "cmapkd"), mean={}, std={}, devices=(),
                         delta=deltas))
    t7 = Table(
        number=7,
        label="tab:by-scene-delta",
        caption=(
            f"CMAPKD's mean recall minus that of another model (points) on the {ds} test split by scene "
            f"type and by object size, seeds pooled, with a 95 % paired bootstrap interval over the test "
            f"images of the column (each with its captions; 2000 resamples); an interval that contains 0 "
            f"is no difference at this test-set size. {subset_note}"
        ),
        columns=tuple(Col(c.id.replace("_pct", "_delta"), c.key, c.header, "delta", None, c.group) for c in columns),
        blocks=(tuple(rows7),) if rows7 else (),
        empty_note=why if not subsets else "no ranks of CMAPKD or of the models it is compared with",
        flops_unit={},
    )
    return [t6, t7]


_METRIC_LABELS = {
    "retrieval_mean": "Mean R",
    **{f"retrieval_{d}_r{k}": f"{'I->T' if d == 'i2t' else 'T->I'} R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)},
    "vqa_probe_overall": "VQA probe",
    "vqa_probe_yes_no": "VQA probe yes/no",
    "vqa_probe_number": "VQA probe number",
    "vqa_probe_other": "VQA probe other",
}


def _zs_name(s: str) -> str:
    return ZEROSHOT_SETS[s][0] if s in ZEROSHOT_SETS else s


def _metric_label(key: str) -> str:
    if key in _METRIC_LABELS:
        return _METRIC_LABELS[key]
    m = _ZEROSHOT_KEY.match(key)
    if m:
        what = {"top1": "top-1", "top5": "top-5", "mean_per_class_recall": "mean recall"}[m["metric"]]
        return f"{_zs_name(m['set'])} {what}"
    return key


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _render(text: str, fmt: Literal["md", "tex", "csv"]) -> str:
    """Plain text with markers -> Markdown / LaTeX / CSV: '->' arrow, '+-' plus-minus."""
    if fmt == "tex":
        text = "".join(_TEX_ESCAPES.get(c, c) for c in text)
        return text.replace("->", r"$\to$").replace("+-", r"$\pm$")
    if fmt == "md":
        return text.replace("->", "→").replace("+-", "±")
    return text.replace("->", " to ").replace("+-", "+/-")


def _cells(table: Table) -> tuple[list[Row], dict[tuple[int, int], Cell]]:
    flat = [r for b in table.blocks for r in b]
    teacher = next((r for r in flat if r.role == "teacher"), None)
    cells = {
        (i, j): _cell(r, c, teacher, table.flops_unit) for i, r in enumerate(flat) for j, c in enumerate(table.columns)
    }
    return flat, cells


def _cell_text(cell: Cell, col: Col, fmt: Literal["md", "tex"], bold: bool) -> str:
    if cell.mean is None:
        return "–" if fmt == "md" else "--"
    s = _fmt(cell.mean, col.kind)
    if col.kind == "delta":
        s = ("+" if cell.mean > 0 and float(s) != 0 else "") + s
        if cell.ci is not None:
            lo, hi = (("+" if v > 0 else "") + _fmt(v, "delta") for v in cell.ci)
            s += f" [{lo}, {hi}]"
    if col.kind == "speedup":
        s += "×" if fmt == "md" else r"$\times$"
    if cell.std is not None:
        s += f" ± {_fmt(cell.std, col.kind)}" if fmt == "md" else f" $\\pm$ {_fmt(cell.std, col.kind)}"
    if bold:
        s = f"**{s}**" if fmt == "md" else f"\\textbf{{{s}}}"
    return s


def _bold_map(table: Table, cells) -> dict[int, set[int]]:
    return {j: _bold_rows(table, j, cells) for j in range(len(table.columns))}


def _md_header(col: Col) -> str:
    return _render(col.md or (f"{col.group} {col.header}" if col.group else col.header), "md")


def render_markdown(table: Table) -> str:
    flat, cells = _cells(table)
    bold = _bold_map(table, cells)
    out = [f"**Table {table.number}.** {_render(table.caption, 'md')}", ""]
    heads = ["Method", "n", *(_md_header(c) for c in table.columns)]
    out.append("| " + " | ".join(heads) + " |")
    out.append("|:--|--:|" + "--:|" * len(table.columns))
    if not flat:
        out.append("| " + " | ".join([f"({table.empty_note})", "", *[""] * len(table.columns)]) + " |")
    for i, r in enumerate(flat):
        name = f"*{r.name} (reference)*" if r.role != "student" else r.name
        vals = [_cell_text(cells[(i, j)], c, "md", i in bold[j]) for j, c in enumerate(table.columns)]
        out.append("| " + " | ".join([name, str(r.n), *vals]) + " |")
    return "\n".join(out) + "\n"


def render_latex(table: Table) -> str:
    flat, cells = _cells(table)
    bold = _bold_map(table, cells)
    ncol = 2 + len(table.columns)
    env = "table*" if len(table.columns) > 6 else "table"
    lines = [
        f"% Table {table.number}: generated by `python -m cmapkd.stages.tables` from reports/metrics/*.json;",
        "% do not edit. Needs \\usepackage{booktabs} and \\usepackage{adjustbox}.",
        f"\\begin{{{env}}}[tbp]",
        "\\centering",
        f"\\caption{{{_render(table.caption, 'tex')}}}",
        f"\\label{{{table.label}}}",
        "\\begin{adjustbox}{max width=\\linewidth}",
        f"\\begin{{tabular}}{{l{'r' * (ncol - 1)}}}",
        "\\toprule",
    ]
    # grouped header line (consecutive columns with the same non-empty group)
    if any(c.group for c in table.columns):
        groups: list[tuple[str, int, int]] = []  # (name, first, last) in 1-based tabular columns
        for j, c in enumerate(table.columns):
            pos = j + 3
            if groups and c.group and groups[-1][0] == c.group and groups[-1][2] == pos - 1:
                groups[-1] = (c.group, groups[-1][1], pos)
            else:
                groups.append((c.group, pos, pos))
        top = ["", ""]
        rules = []
        for name, a, b in groups:
            if not name:
                top.append("")
            else:
                top.append(f"\\multicolumn{{{b - a + 1}}}{{c}}{{{_render(name, 'tex')}}}")
                rules.append(f"\\cmidrule(lr){{{a}-{b}}}")
        lines.append(" & ".join(top) + " \\\\")
        lines.append("".join(rules))
    lines.append(" & ".join(["Method", "$n$", *(_render(c.header, "tex") for c in table.columns)]) + " \\\\")
    lines.append("\\midrule")
    if not flat:
        lines.append(f"\\multicolumn{{{ncol}}}{{c}}{{({_render(table.empty_note, 'tex')})}} \\\\")
    i = 0
    for bi, block in enumerate(table.blocks):
        if bi:
            lines.append("\\midrule")
        for r in block:
            name = _render(r.name, "tex")
            if r.role != "student":
                name = f"\\textit{{{name}}}"
            vals = [_cell_text(cells[(i, j)], c, "tex", i in bold[j]) for j, c in enumerate(table.columns)]
            lines.append(" & ".join([name, str(r.n), *vals]) + " \\\\")
            i += 1
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{adjustbox}", f"\\end{{{env}}}"]
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.6f}"


def render_csv(table: Table) -> str:
    """One row per model group, display units (percent, millions, ...), 6 decimals; std blank when n = 1."""
    flat, cells = _cells(table)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["block", "model", "method", "role", "n", "seeds"]
    for c in table.columns:
        head += [c.id, *((f"{c.id}_ci_lo", f"{c.id}_ci_hi") if c.kind == "delta" else (f"{c.id}_std",))]
    w.writerow(head)
    i = 0
    for bi, block in enumerate(table.blocks):
        for r in block:
            row = [bi, r.group, _render(r.name, "csv"), r.role, r.n, " ".join(map(str, r.seeds))]
            for j, c in enumerate(table.columns):
                cell = cells[(i, j)]
                extra = [_num(v) for v in (cell.ci or (None, None))] if c.kind == "delta" else [_num(cell.std)]
                row += [_num(cell.mean), *extra]
            w.writerow(row)
            i += 1
    return buf.getvalue()


RENDERERS: dict[str, Callable[[Table], str]] = {"md": render_markdown, "tex": render_latex, "csv": render_csv}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)


def write_tables(
    metrics_dir: str | Path,
    out_dir: str | Path,
    headline_metric: str = "retrieval_mean",
    dataset: str = "emojiscenes",
    seeds: list[int] | None = None,
    ablations: list[str] | None = None,
    stages: list[str] | None = None,
    ranks_dir: str | Path | None = None,
    methods: list[str] | None = None,
    imagenet_templates: str = "openai",
    test_manifest: str | Path | None = None,
) -> dict:
    """Load the metrics, build Tables 2-7 and write `TABLE_FILES` into `out_dir`.

    `seeds`: the training seeds of the current params; metrics of a seeded model (`<group>-s<N>`)
    with another seed are left out (files of an earlier `seeds` list stay in the metrics folder).
    `ablations`: params `ablation_runs`; metrics of other ablations (`abl-<name>`) are left out alike.
    `stages`: params `stage_evals`; metrics of other intermediate stages (`cmapkd-<stage>-s<N>`) too.
    `methods`: params `baselines.methods`; metrics of other baselines (`<method>-s<N>`) are left out alike.
    `imagenet_templates`: params `prepare.paper.imagenet_templates`, named in Table 3's caption.
    `test_manifest`: the test split's manifest-test.jsonl (scene types, object sizes): Tables 6-7,
    written with `ranks_dir` (empty, saying why, for data without scene types).
    `ranks_dir`: per-query ranks (`<model>.npz`, evaluate's --ranks); Table 2 then gets every
    student's difference in mean recall to Scratch with its paired bootstrap interval.
    Returns a summary: the files written, the rows of each table, the groups ignored, the deltas."""
    runs = load_runs(metrics_dir, check_sets=False)

    def stage_of(model: str) -> str | None:
        m = _STAGE_MODEL.match(model)
        return m["stage"] if m else None

    # files of an earlier, longer params list stay in the metrics folder: leave them out
    current = [
        ("seeds", seeds, lambda r: r.seed if _SEED_SUFFIX.match(r.model) else None),
        ("ablation_runs", ablations, lambda r: r.model[4:] if r.model.startswith("abl-") else None),
        ("stage_evals", stages, lambda r: stage_of(r.model)),
        ("baselines.methods", methods,
         lambda r: r.group if r.group in {g for g, _ in HEADLINE} - {"cmapkd"} else None),
    ]
    for key, listed, member in current:
        if listed is None:
            continue
        for r in [r for r in runs if member(r) is not None and member(r) not in listed]:
            log.warning("leaving out %s: %r is not in params %s %s", r.path, member(r), key, list(listed))
            runs.remove(r)
    check_zeroshot_sets(runs)  # after the leftovers went: an earlier run's files may have other sets
    unknown = sorted({r.group for r in runs} - KNOWN_GROUPS)
    for g in unknown:
        log.warning("ignoring metrics of unknown model group '%s' (%s)", g,
                    ", ".join(str(r.path) for r in runs if r.group == g))
    deltas = deltas_vs_scratch(runs, ranks_dir) if ranks_dir is not None else {}
    tables = build_tables(runs, headline_metric, dataset, deltas, imagenet_templates)
    given = ranks_dir is not None and test_manifest is not None
    tables += build_subset_tables(runs, ranks_dir, test_subsets(test_manifest) if given else None, dataset,
                                  why=None if given else "needs the per-query ranks and the test manifest "
                                                         "(cmapkd tables --ranks ... --data ...)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for t in tables:
        for ext, render in RENDERERS.items():
            p = out / f"table{t.number}.{ext}"
            _write_atomic(p, render(t))
            written.append(p)
    return {
        "files": written,
        "rows": {t.number: [(r.group, r.n) for b in t.blocks for r in b] for t in tables},
        "ignored": unknown,
        "deltas": deltas,
    }


def deltas_vs_scratch(runs: list[Run], ranks_dir: str | Path) -> dict:
    """group -> `stats.Delta` of its mean recall vs Scratch for every headline group (Scratch's seeds
    pooled against the group's seeds pooled; `cmapkd.report.stats`). Empty without Scratch runs."""
    from cmapkd.report.stats import RanksError, paired_delta, read_ranks

    def ranks_of(group: str) -> list:
        mine = sorted((r for r in runs if r.group == group), key=lambda r: r.seed)
        try:
            return [read_ranks(Path(ranks_dir) / f"{r.model}.npz") for r in mine]
        except RanksError as e:
            raise ReportError(str(e)) from e

    base = ranks_of(SCRATCH)
    if not base:
        return {}
    out = {}
    for group, _ in HEADLINE:
        if group != SCRATCH and any(r.group == group for r in runs):
            try:
                out[group] = paired_delta(ranks_of(group), base)
            except RanksError as e:
                raise ReportError(f"{ranks_dir}: {group} vs {SCRATCH}: {e}") from e
    return out
