"""Evaluate one model: the flat metrics JSON and the figure arrays of the `evaluate` stage.

`evaluate_model(params, model_dir, data_root, teacher_dir, device)` wires the metric library
(`cmapkd.eval.retrieval`, `.zeroshot`, `.vqa`, `.efficiency`) to one model and returns
`(metrics, figdata)`; `write_metrics` / `save_figdata` store them. Protocols and the full schemas:
docs/evaluation.md.

Models. `models/student_init` (the student before any distillation, method `init`), `random` (the
student architecture with random weights, method `random`: a reference), `models/teacher`
(spec.json, the teacher stage's output; loaded with `load_teacher`) or a
training run's folder: `model.safetensors` (the method's state dict: `student.*` is the student
DualEncoder, other keys are the method's own modules) and `summary.json` (`run`, `method`,
`seed`). A CMAPKD model is rebuilt as the whole distiller (`build_method(params, "stage4b", ...)`)
and loaded strictly, so the ALSN and the UCMP adapters are there for the figure arrays; any other
method loads only its `student.*` entries, strictly.

Metrics (plain floats / ints / strings, keys sorted):
- identity: `model` (the folder name), `method` (`teacher`, `cmapkd`, `scratch`, ...), `seed`;
- retrieval on the test split (CLIP_benchmark protocol): `retrieval_{i2t,t2i}_r{1,5,10}`,
  `retrieval_mean`;
- zero-shot, per set of `evaluate.zeroshot`: `zeroshot_<set>_{top1,top5,mean_per_class_recall}`;
- VQA PROBE (frozen embeddings, answer head trained on the train split, scored on the test split,
  or on val when test has no questions): `vqa_probe_{overall,yes_no,number,other}` and
  `vqa_probe_split` (the split scored);
- health: `img_emb_mean_cos`, `txt_emb_mean_cos` (mean pairwise cosine of the test embeddings);
- efficiency: `params_{image,text,total}`, `flops_per_{image,caption}`,
  `latency_ms_{image,text}_b{1,32}`, `throughput_images_per_s`, `device`, `latency_threads`.

Every value is deterministic for a given model, data and machine (CPU, same thread count) except
the wall-clock ones, `TIMING_KEYS`.

Figure arrays (CMAPKD models and the teacher; None for other methods), for a fixed subset of
`figure_samples` test images drawn with `evaluate.figure_seed` (the same subset for every model):
see `FIGDATA_DOC` and docs/evaluation.md. `difficulty` is the TEACHER's difficulty of a sample:
1 - the teacher's softmax probability (its own learned logit scale) of the sample's first caption
among the first captions of all the subset's samples (image -> text). It is a property of the
sample, identical in every model's file, continuous (few ties, so samples sort cleanly from easy to
hard) and measured by the model the students imitate; the scene annotations give two cruder,
teacher-free alternatives, `n_objects` and `min_object_px`.
"""

from __future__ import annotations

import io
import json
import logging
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cmapkd.data import ImageTextDataset, ZeroShotSet, load_vqa, read_info
from cmapkd.eval.efficiency import count_flops, count_params, measure_latency
from cmapkd.eval.retrieval import DIRECTIONS, flatten_retrieval, query_ranks
from cmapkd.eval.vqa import answers_from_annotations, flatten_vqa, train_vqa_probe, vqa_accuracy
from cmapkd.eval.zeroshot import build_zeroshot_weights, zeroshot_classify
from cmapkd.models.encoders import DualEncoder
from cmapkd.models.towers import length_batches

log = logging.getLogger("cmapkd.eval")

MODEL_FILE = "model.safetensors"
SUMMARY_FILE = "summary.json"
TEACHER_METHOD = "teacher"
INIT_METHOD = "init"  # the student as the student_init stage leaves it (pretrained towers, aligned heads)
RANDOM_METHOD = "random"  # the student architecture with random weights (a reference, never trained)
RANDOM_MODEL = "random"  # `--model random` evaluates it
METHODS = ("cmapkd", "scratch", "kd", "fitnet", "clipkd", "promptkd", "c2kd", "llavakd")
# runs of the CMAPKD chain whose summary.json may predate the `method` key
_CMAPKD_RUNS = ("stage1", "stage2", "stage3", "stage4a", "stage4b", "onestage")

RETRIEVAL_KEYS = tuple(f"retrieval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)) + ("retrieval_mean",)
VQA_KEYS = ("vqa_probe_overall", "vqa_probe_yes_no", "vqa_probe_number", "vqa_probe_other")
ZEROSHOT_SUFFIXES = ("top1", "top5", "mean_per_class_recall")
EFFICIENCY_KEYS = (
    "params_image", "params_text", "params_total", "flops_per_image", "flops_per_caption",
    "latency_ms_image_b1", "latency_ms_image_b32", "latency_ms_text_b1", "latency_ms_text_b32",
    "throughput_images_per_s", "device", "latency_threads",
)
IDENTITY_KEYS = ("model", "method", "seed")
# collapse check: mean pairwise cosine of the test image / caption embeddings (1.0 = collapsed)
HEALTH_KEYS = ("img_emb_mean_cos", "txt_emb_mean_cos")
# wall-clock measurements: the only keys that differ between two runs on the same machine
TIMING_KEYS = ("latency_ms_image_b1", "latency_ms_image_b32", "latency_ms_text_b1", "latency_ms_text_b32",
               "throughput_images_per_s")
LATENCY_BATCHES = (1, 32)


def zeroshot_keys(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"zeroshot_{n}_{s}" for n in names for s in ZEROSHOT_SUFFIXES)


def fraction_keys(zeroshot_sets: Sequence[str]) -> tuple[str, ...]:
    """Metrics that are fractions in [0, 1]."""
    return RETRIEVAL_KEYS + zeroshot_keys(zeroshot_sets) + VQA_KEYS


def metric_keys(zeroshot_sets: Sequence[str]) -> tuple[str, ...]:
    """Every key of a metrics JSON, sorted."""
    return tuple(sorted(IDENTITY_KEYS + fraction_keys(zeroshot_sets) + EFFICIENCY_KEYS + HEALTH_KEYS + ("vqa_probe_split",)))


# figure-data keys -> (shape, meaning); N samples, C student pyramid width, E teacher embedding width
FIGDATA_DOC = {
    "sample_index": ("[N] int64", "test-split image index (sorted)"),
    "scene_type": ("[N] str", "manifest `scene_type` ('' when the data has none)"),
    "caption": ("[N] str", "the image's first caption"),
    "difficulty": ("[N] float32", "teacher: 1 - softmax prob. of the first caption among the subset's first captions"),
    "n_objects": ("[N] int64", "objects in the scene (manifest; 0 when unannotated)"),
    "min_object_px": ("[N] int64", "longest side of the smallest object in pixels (manifest; 0 when unannotated)"),
    "teacher_levels": ("[N, 4, E] float32", "teacher P2..P5 pooled and mapped by its level heads (t_vis_pool)"),
    "crossmodal_sim": ("[N, 4, 4] float32", "cosine of visual level i and language level j (same space)"),
    "crossmodal_sim_mean": ("[4, 4] float32", "crossmodal_sim averaged over the samples"),
    "alsn_w_v": ("[N, 4] float32", "CMAPKD: ALSN weights over P2..P5 (eval mode, all levels; rows sum to 1)"),
    "alsn_w_l": ("[N, 4] float32", "CMAPKD: ALSN weights over L1..L4"),
    "student_levels": ("[N, 4, C] float32", "CMAPKD: GAP of the student's UCMP pyramid P2..P5"),
    "student_level_emb": ("[N, 4, E] float32", "CMAPKD: those levels projected into the teacher's space (vis_emb)"),
    "teacher_sha256": ("[] str", "weights digest of the teacher (spec.json identity)"),
    "data_digest": ("[] str", "digest of the processed data (info.json)"),
}
TEACHER_FIGDATA_KEYS = ("sample_index", "scene_type", "caption", "difficulty", "n_objects", "min_object_px",
                        "teacher_levels", "crossmodal_sim", "crossmodal_sim_mean", "teacher_sha256", "data_digest")
CMAPKD_FIGDATA_KEYS = TEACHER_FIGDATA_KEYS + ("alsn_w_v", "alsn_w_l", "student_levels", "student_level_emb")


class EvaluationError(ValueError):
    """A model folder is incomplete or does not fit the model built from params (names the file)."""


# --------------------------------------------------------------------------------------------
# Loading a model folder
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    name: str  # the folder's name: the metrics' `model`
    method: str
    seed: int
    encoder: DualEncoder  # what is evaluated (the student, or the teacher)
    distiller: torch.nn.Module | None = None  # the whole CMAPKD distiller (figure arrays), else None

    @property
    def is_teacher(self) -> bool:
        return self.method == TEACHER_METHOD


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise EvaluationError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvaluationError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise EvaluationError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def is_teacher_dir(model_dir: Path, teacher_dir: Path | None = None) -> bool:
    """The teacher stage's folder: spec.json of the teacher format and no model.safetensors."""
    from cmapkd.distill.teacher import SPEC_FILE, SPEC_FORMAT

    if teacher_dir is not None and model_dir.resolve() == Path(teacher_dir).resolve():
        return True
    spec = model_dir / SPEC_FILE
    if (model_dir / MODEL_FILE).exists() or not spec.is_file():
        return False
    try:
        return json.loads(spec.read_text(encoding="utf-8")).get("format") == SPEC_FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def teacher_spec(teacher_dir: Path) -> dict:
    from cmapkd.distill.teacher import SPEC_FILE

    path = Path(teacher_dir) / SPEC_FILE
    return _read_json(path, "teacher spec (run `dvc repro teacher`)") if path.is_file() else {}


def teacher_dims_of(params, teacher_dir: Path):
    """TeacherDims from the identity the teacher stage recorded (no teacher forward needed), or
    from the loaded teacher when spec.json has none."""
    from cmapkd.models.ucmp import TeacherDims

    ident = teacher_spec(teacher_dir).get("identity") or {}
    try:
        return TeacherDims(tuple(int(c) for c in ident["image"]["level_channels"]),
                           tuple(int(d) for d in ident["text"]["level_dims"]), int(ident["embed_dim"]))
    except (KeyError, TypeError, ValueError):
        from cmapkd.distill.teacher import load_teacher

        return TeacherDims.from_encoder(load_teacher(params.model, teacher_dir))


def _method_of(summary: dict, path: Path) -> str:
    method = summary.get("method")
    if method is None:  # summaries written before `method` was recorded
        run = summary.get("run")
        if run in _CMAPKD_RUNS:
            method = "cmapkd"
        elif run in METHODS:
            method = run
        else:
            raise EvaluationError(f"{path}: no 'method' key (and run {run!r} does not name one); "
                                  f"expected one of {list(METHODS)}")
        log.warning("%s: no 'method' key; taking %r from run %r", path, method, run)
    if method not in METHODS:
        raise EvaluationError(f"{path}: unknown method {method!r}; expected one of {list(METHODS)}")
    return method


def _seed_of(summary: dict, path: Path, default: int) -> int:
    seed = summary.get("seed")
    if seed is None:
        log.warning("%s: no 'seed' key; using params seed %d", path, default)
        return int(default)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EvaluationError(f"{path}: 'seed' must be an integer, got {seed!r}")
    return seed


def _read_state(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise EvaluationError(f"{path}: model weights not found (run the training stage first)")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise EvaluationError(f"{path}: not a readable safetensors file ({e})") from e


def load_model(params, model_dir: str | Path, teacher_dir: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load the model of a folder (module docstring), frozen, in eval mode, on `device`."""
    from cmapkd.distill.teacher import TeacherError, load_teacher
    from cmapkd.models.encoders import build_encoder, freeze

    model_dir, teacher_dir = Path(model_dir), Path(teacher_dir)
    device = torch.device(device)
    if str(model_dir) == RANDOM_MODEL:
        return LoadedModel(RANDOM_MODEL, RANDOM_METHOD, int(params.seed), freeze(random_student(params, params.seed).to(device)))
    if not model_dir.is_dir():
        raise EvaluationError(f"{model_dir}: model folder not found")
    name = model_dir.resolve().name
    if is_teacher_dir(model_dir, teacher_dir) and teacher_spec(model_dir).get("role") == "student":
        try:  # the student_init stage's folder: the student every run starts from
            student = load_teacher(params.model.student, model_dir)
        except (TeacherError, FileNotFoundError) as e:
            raise EvaluationError(str(e)) from e
        return LoadedModel(name, INIT_METHOD, int(params.seed), freeze(student.to(device)))
    if is_teacher_dir(model_dir, teacher_dir):
        try:
            teacher = load_teacher(params.model, model_dir)
        except (TeacherError, FileNotFoundError) as e:
            raise EvaluationError(str(e)) from e
        training = teacher_spec(model_dir).get("training") or {}
        seed = training.get("seed", params.seed)
        return LoadedModel(name, TEACHER_METHOD, int(seed), freeze(teacher.to(device)))
    summary_path, weights_path = model_dir / SUMMARY_FILE, model_dir / MODEL_FILE
    summary = _read_json(summary_path, "run summary (written with the weights by the training stage)")
    method = _method_of(summary, summary_path)
    seed = _seed_of(summary, summary_path, params.seed)
    state = _read_state(weights_path)
    if method == "cmapkd":
        from cmapkd.distill.runs import build_method

        distiller = build_method(params, "stage4b", None, teacher_dims_of(params, teacher_dir))
        try:
            distiller.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise EvaluationError(f"{weights_path}: does not fit the CMAPKD model built from params: {e}") from e
        distiller = freeze(distiller.to(device))
        return LoadedModel(name, method, seed, distiller.student, distiller)
    sub = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    if not sub:
        raise EvaluationError(f"{weights_path}: no 'student.*' entries (keys start with "
                              f"{sorted({k.split('.')[0] for k in state})[:5]})")
    student = build_encoder(params.model.student)
    try:
        student.load_state_dict(sub, strict=True)
    except RuntimeError as e:
        raise EvaluationError(f"{weights_path}: the 'student.*' entries do not fit the student built "
                              f"from params (model.student): {e}") from e
    return LoadedModel(name, method, seed, freeze(student.to(device)))


def random_student(params, seed: int) -> DualEncoder:
    """The student architecture of `model.student` with every weight re-drawn from its module's own
    initialiser (`reset_parameters`) under `seed`: no pretrained tower, no trained head. The
    reference that shows what the VQA probe and zero-shot reach on features that carry nothing."""
    from cmapkd.models.encoders import build_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = build_encoder(params.model.student)
        for m in enc.modules():
            if hasattr(m, "reset_parameters") and m is not enc:
                m.reset_parameters()
    enc.name = f"{enc.name}:random-weights"
    return enc


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def _image_batch(images, rows) -> Tensor:
    """uint8 [B, 3, H, W] from an [n, H, W, 3] array-like (memmap or ShardedImages)."""
    arr = images[rows]
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2)  # memmaps are read-only


def _bar(iterable, total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not progress, unit="batch", leave=False)


@torch.inference_mode()
def embed_images(model: DualEncoder, images, batch_size: int, device: torch.device, rows: Sequence[int] | None = None,
                 progress: bool = False, desc: str = "images") -> Tensor:
    """L2-normalised final image embeddings [n, E] (float32, CPU) of `images[rows]` (all rows by
    default), in order, `batch_size` at a time."""
    n = len(images) if rows is None else len(rows)
    starts = range(0, n, batch_size)
    out = []
    for s in _bar(starts, len(starts), desc, progress):
        sel = slice(s, min(s + batch_size, n)) if rows is None else [int(r) for r in rows[s : s + batch_size]]
        out.append(model.encode_image(_image_batch(images, sel).to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.image.embed_dim)


@torch.inference_mode()
def embed_texts(model: DualEncoder, texts: Sequence[str], batch_size: int, device: torch.device,
                progress: bool = False, desc: str = "texts") -> Tensor:
    """L2-normalised final text embeddings [n, E] (float32, CPU), in order; each distinct text is
    encoded once (VQA questions repeat a lot), in batches of similar token length (the BERT
    teacher drops the padding after a batch's longest text, `trim_padding`)."""
    unique = list(dict.fromkeys(texts))
    where = {t: i for i, t in enumerate(unique)}
    if not unique:
        return torch.zeros(0, model.image.embed_dim)
    ids, mask = model.tokenize(unique)
    batches, _ = length_batches(mask, batch_size)
    emb = torch.empty(len(unique), model.image.embed_dim)
    for sel in _bar(batches, len(batches), desc, progress):
        emb[sel] = model.encode_text(ids[sel].to(device), mask[sel].to(device)).float().cpu()
    return emb[torch.tensor([where[t] for t in texts], dtype=torch.long)]


# --------------------------------------------------------------------------------------------
# The four parts
# --------------------------------------------------------------------------------------------


def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, text_to_image: Sequence[int],
                      ranks_out: dict | None = None) -> dict[str, float]:
    """Recall@1/5/10 both ways and their mean; `ranks_out` receives the per-query ranks."""
    ranks = query_ranks(image_emb, text_emb, text_to_image)
    if ranks_out is not None:
        ranks_out.update({f"{d}_rank": ranks[d].numpy().astype(np.int32) for d in DIRECTIONS})
        ranks_out["text_to_image"] = np.asarray(text_to_image, dtype=np.int32)
    return flatten_retrieval({d: {k: float((ranks[d] < k).double().mean()) for k in (1, 5, 10)} for d in DIRECTIONS})


def mean_pairwise_cosine(emb: Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct rows: 1.0 when every row points the same
    way (a collapsed embedding), about 0 for unrelated directions."""
    e = F.normalize(emb.double(), dim=-1)
    n = e.shape[0]
    if n < 2:
        return float("nan")
    total = (e.sum(0) @ e.sum(0)) - n  # sum over i != j of e_i . e_j
    return float(total / (n * (n - 1)))


def health_metrics(image_emb: Tensor, text_emb: Tensor) -> dict[str, float]:
    """Collapse check of the test embeddings: `img_emb_mean_cos`, `txt_emb_mean_cos`."""
    return {"img_emb_mean_cos": mean_pairwise_cosine(image_emb), "txt_emb_mean_cos": mean_pairwise_cosine(text_emb)}


def zeroshot_metrics(model: DualEncoder, data_root: Path, names: Sequence[str], batch_size: int,
                     device: torch.device, progress: bool = False) -> dict[str, float]:
    """Top-1, top-5 and mean per-class recall on each zero-shot set (class weights: the mean of the
    normalised template embeddings, renormalised)."""
    out: dict[str, float] = {}
    for name in names:
        zs = ZeroShotSet(data_root, name)
        img = embed_images(model, zs.images, batch_size, device, progress=progress, desc=f"zero-shot {name}")

        def encode(texts: list[str]) -> Tensor:
            return embed_texts(model, texts, batch_size, device)

        per_call = max(1, 8 * batch_size // len(zs.templates))  # embed_texts batches them again
        weights = build_zeroshot_weights(encode, zs.classnames, zs.templates, classes_per_batch=per_call)
        out.update(zeroshot_classify(img, weights, zs.labels).metrics(f"zeroshot_{name}"))
    return out


def _vqa_rows(questions: dict, manifest: list[dict], split: str, max_images: int = 0) -> tuple[list[dict], list[int]]:
    """The questions (of the first `max_images` images of the split; 0 = all) and each one's image
    index in the split."""
    index = {row["image_id"]: row["index"] for row in manifest}
    qs, rows = [], []
    for q in questions["questions"]:
        i = index.get(q["image_id"])
        if i is None:
            raise EvaluationError(f"VQA {split}: question {q['question_id']} refers to image_id {q['image_id']}, "
                                  f"which is not in manifest-{split}.jsonl")
        if max_images and i >= max_images:
            continue
        qs.append(q)
        rows.append(i)
    return qs, rows


def vqa_eval_split(data_root: Path) -> str:
    """`test` when it has VQA questions, otherwise `val`."""
    path = Path(data_root) / "vqa" / "questions-test.json"
    if path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("questions"):
        return "test"
    return "val"


def vqa_probe_metrics(model: DualEncoder, data_root: Path, probe, batch_size: int, device: torch.device,
                      split_images: dict[str, tuple[ImageTextDataset, Tensor]] | None = None,
                      progress: bool = False) -> dict:
    """The VQA PROBE: an answer head (`train_vqa_probe`, recipe `probe` = params.evaluate.vqa_probe,
    trained on one CPU thread) on the model's frozen image and question embeddings of the train split's
    questions (those of its first `probe.train_images` images), scored with the official VQA
    accuracy on the test split (val when test has none). `split_images` may hold already computed
    image embeddings of a whole split (`{split: (dataset, emb)}`)."""
    split_images = dict(split_images or {})
    eval_split = vqa_eval_split(data_root)

    def embed_split(split: str, max_images: int = 0):
        questions, annotations = load_vqa(data_root, split)
        if split in split_images:
            ds, all_img = split_images[split]
        else:
            ds, all_img = ImageTextDataset(data_root, split), None
        qs, rows = _vqa_rows(questions, ds.manifest, split, max_images)
        if not qs:
            raise EvaluationError(f"{data_root}/vqa/questions-{split}.json: no questions to "
                                  f"{'train' if split == 'train' else 'score'} the VQA probe on")
        if all_img is None:  # embed only the images that have questions
            used = sorted(set(rows))
            emb = embed_images(model, ds.images, batch_size, device, used, progress, f"VQA {split} images")
            pos = {r: k for k, r in enumerate(used)}
            img = emb[torch.tensor([pos[r] for r in rows], dtype=torch.long)]
        else:
            img = all_img[torch.tensor(rows, dtype=torch.long)]
        q_emb = embed_texts(model, [q["question"] for q in qs], batch_size, device, progress, f"VQA {split} questions")
        return qs, annotations, img, q_emb

    train_q, train_a, train_img, train_txt = embed_split("train", probe.train_images)
    answers = answers_from_annotations(train_a, [q["question_id"] for q in train_q])
    eval_q, eval_a, eval_img, eval_txt = embed_split(eval_split)
    # The head is tiny: one CPU thread is fast, and it makes the probe bit-identical on any machine
    # (results depend on the thread count) and immune to oversubscribed cores, where many small
    # multi-threaded ops are 5-10x slower. Trained outside inference mode, on plain copies.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_vqa_probe(train_img.clone(), train_txt.clone(), answers, top_n=probe.top_answers,
                                 hidden=probe.hidden, dropout=probe.dropout, epochs=probe.epochs, lr=probe.lr,
                                 weight_decay=probe.weight_decay, batch_size=probe.batch_size, seed=probe.seed,
                                 device="cpu")
        preds = result.predict(eval_img.clone(), eval_txt.clone())
    finally:
        torch.set_num_threads(threads)
    ids = {q["question_id"] for q in eval_q}
    anns = [a for a in eval_a["annotations"] if a["question_id"] in ids]
    acc = vqa_accuracy(None, {"annotations": anns},
                       [{"question_id": q["question_id"], "answer": p} for q, p in zip(eval_q, preds)])
    out: dict = flatten_vqa(acc, "vqa_probe")
    absent = [k for k in VQA_KEYS if k not in out]
    if absent:  # no question of that answer type in the scored split: the key is left out
        log.warning("VQA %s split: no questions for %s", eval_split, ", ".join(absent))
    out["vqa_probe_split"] = eval_split
    return out


def tower_params(model: DualEncoder) -> tuple[int, int, int]:
    """(image, text, total) parameter counts. open_clip towers only reference the CLIP model the
    dual encoder owns: image = `clip.visual`, text = the rest less the logit scale/bias."""
    total = count_params(model)
    clip = getattr(model, "clip", None)
    if clip is None:
        return count_params(model.image), count_params(model.text), total
    image = count_params(clip.visual)
    skip = {id(p) for p in clip.visual.parameters()}
    skip |= {id(getattr(clip, k)) for k in ("logit_scale", "logit_bias") if isinstance(getattr(clip, k, None), torch.nn.Parameter)}
    seen: set[int] = set()
    text = 0
    for p in model.parameters():
        if id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            text += p.numel()
    return image, text, total


def efficiency_metrics(model: DualEncoder, ds: ImageTextDataset, latency, device: torch.device) -> dict:
    """Parameters, FLOPs (FlopCounterMode, 2 per multiply-add, batch 1) and latency (median of
    `latency.repeats` calls after `latency.warmup`, batch 1 and 32) of `encode_image` on images
    already at the tower's input size (float [0, 1]: normalisation included, decoding and resizing
    from the stored resolution not) and of `encode_text` on tokenised test captions (tokenising not
    included). Inputs are the first test images and captions, so every model sees the same. A
    causal CLIP text tower always runs its whole context; the BERT teacher skips the padding after
    the longest caption of the batch (`trim_padding`), as it does in evaluation."""
    image, text, total = tower_params(model)
    n = max(LATENCY_BATCHES)
    size = model.image.image_size
    x = _image_batch(ds.images, slice(0, n)).float() / 255.0
    x = torch.cat([x] * -(-n // len(x)))[:n] if len(x) < n else x  # tiny sets: repeat images
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.to(device)
    caps = ds.flat_captions()
    caps = (caps * -(-n // len(caps)))[:n]
    ids, mask = model.tokenize(caps)
    ids, mask = ids.to(device), mask.to(device)
    out: dict = {
        "params_image": int(image), "params_text": int(text), "params_total": int(total),
        "flops_per_image": float(count_flops(model.encode_image, x[:1]).per_item),
        "flops_per_caption": float(count_flops(model.encode_text, ids[:1], mask[:1]).per_item),
    }
    for b in LATENCY_BATCHES:
        r = measure_latency(model.encode_image, (x[:b],), latency.warmup, latency.repeats)
        out[f"latency_ms_image_b{b}"] = round(r.median_ms, 4)
        if b == max(LATENCY_BATCHES):
            out["throughput_images_per_s"] = round(r.throughput, 3)
        out["device"], out["latency_threads"] = r.device, int(r.num_threads)
        t = measure_latency(model.encode_text, (ids[:b], mask[:b]), latency.warmup, latency.repeats)
        out[f"latency_ms_text_b{b}"] = round(t.median_ms, 4)
    return out


# --------------------------------------------------------------------------------------------
# Figure arrays
# --------------------------------------------------------------------------------------------


def figure_subset(n_test: int, n: int, seed: int) -> np.ndarray:
    """Sorted test indices of the figure subset: `n` (at most all) drawn without replacement by a
    generator seeded with `seed` alone, so every model gets the same subset."""
    n = min(int(n), int(n_test))
    return np.sort(np.random.default_rng(seed).choice(n_test, size=n, replace=False)).astype(np.int64)


def sample_annotations(ds: ImageTextDataset, idx: np.ndarray) -> dict[str, np.ndarray]:
    rows = [ds.manifest[int(i)] for i in idx]
    objs = [r.get("objects") or [] for r in rows]
    return {
        "sample_index": idx.astype(np.int64),
        "scene_type": np.array([str(r.get("scene_type", "")) for r in rows], dtype=str),
        "caption": np.array([ds.captions[int(i)][0] for i in idx], dtype=str),
        "n_objects": np.array([len(o) for o in objs], dtype=np.int64),
        "min_object_px": np.array([min((int(x.get("px", 0)) for x in o), default=0) for o in objs], dtype=np.int64),
    }


def _pairwise_cos(a: Tensor, b: Tensor) -> Tensor:
    """[B, 4, E] x [B, 4, E] -> [B, 4, 4]: cosine of a[:, i] and b[:, j]."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(1, 2)


def _first_captions(ds: ImageTextDataset, idx: np.ndarray) -> list[str]:
    return [ds.captions[int(i)][0] for i in idx]


@torch.inference_mode()
def teacher_figure_arrays(teacher: DualEncoder, ds: ImageTextDataset, idx: np.ndarray, batch_size: int,
                          device: torch.device) -> dict[str, np.ndarray]:
    """`teacher_levels` (t_vis_pool), the teacher's `crossmodal_sim` (t_vis_pool_i vs t_txt_pool_j of
    the first caption) and `difficulty` (module docstring) of the subset `idx`."""
    from cmapkd.models.ucmp import teacher_image_targets, teacher_text_targets

    caps = _first_captions(ds, idx)
    vis, img, txt, temb = [], [], [], []
    for s in range(0, len(idx), batch_size):
        x = _image_batch(ds.images, [int(i) for i in idx[s : s + batch_size]]).to(device)
        out = teacher.image(teacher.image.prepare(x))
        t = teacher_image_targets(teacher, out, [lv.shape[-2:] for lv in out.levels])
        vis.append(t["t_vis_pool"].float().cpu())
        img.append(t["t_img_emb"].float().cpu())
        ids, mask = teacher.tokenize(caps[s : s + batch_size])
        u = teacher_text_targets(teacher, teacher.text(ids.to(device), mask.to(device)))
        txt.append(u["t_txt_pool"].float().cpu())
        temb.append(u["t_txt_emb"].float().cpu())
    vis_t, txt_t = torch.cat(vis), torch.cat(txt)
    logits = float(teacher.logit_scale.exp()) * (torch.cat(img).double() @ torch.cat(temb).double().T)
    p_right = logits.softmax(dim=1).diagonal()
    sim = _pairwise_cos(vis_t, txt_t)
    return {
        "teacher_levels": vis_t.numpy().astype(np.float32),
        "crossmodal_sim": sim.numpy().astype(np.float32),
        "difficulty": (1.0 - p_right).numpy().astype(np.float32),
    }


@torch.inference_mode()
def cmapkd_figure_arrays(distiller, ds: ImageTextDataset, idx: np.ndarray, batch_size: int,
                         device: torch.device) -> dict[str, np.ndarray]:
    """The student side of a CMAPKD distiller on the subset: the ALSN weights (what
    `CMAPKDDistiller.alsn_weights` gives: eval mode, all levels), GAP(P2..P5) through the UCMP, their
    projections into the teacher space (`vis_emb`) and the cosine of `vis_emb` level i with the
    first caption's `txt_emb` level j."""
    distiller.eval()
    caps = _first_captions(ds, idx)
    keys = ("w_v", "w_l", "vis_vec", "vis_emb", "sim")
    parts: dict[str, list] = {k: [] for k in keys}
    for s in range(0, len(idx), batch_size):
        x = _image_batch(ds.images, [int(i) for i in idx[s : s + batch_size]]).to(device)
        ids, mask = distiller.student.tokenize(caps[s : s + batch_size])
        f = distiller._student(x, ids.to(device), mask.to(device))
        w_v, w_l = distiller.alsn(f["vis_vec"][:, 3], f["txt_vec"][:, 3])
        for k, v in (("w_v", w_v), ("w_l", w_l), ("vis_vec", f["vis_vec"]), ("vis_emb", f["vis_emb"]),
                     ("sim", _pairwise_cos(f["vis_emb"], f["txt_emb"]))):
            parts[k].append(v.float().cpu())
    cat = {k: torch.cat(v).numpy().astype(np.float32) for k, v in parts.items()}
    return {"alsn_w_v": cat["w_v"], "alsn_w_l": cat["w_l"], "student_levels": cat["vis_vec"],
            "student_level_emb": cat["vis_emb"], "crossmodal_sim": cat["sim"]}


def _reuse_teacher_arrays(path: Path, idx: np.ndarray, teacher_sha: str, digest: str) -> dict | None:
    """teacher_levels / difficulty from the teacher's own figdata file when it was made by the same
    teacher on the same data and subset; None (with a log line saying why) otherwise."""
    try:
        with np.load(path, allow_pickle=False) as z:
            got = {k: z[k] for k in ("sample_index", "teacher_levels", "difficulty", "teacher_sha256", "data_digest")}
    except (OSError, KeyError, ValueError) as e:
        log.warning("%s: cannot reuse the teacher's figure arrays (%s); computing them", path, e)
        return None
    why = None
    if str(got["teacher_sha256"]) != teacher_sha or not teacher_sha:
        why = "another teacher"
    elif str(got["data_digest"]) != digest:
        why = "other data"
    elif not np.array_equal(got["sample_index"], idx):
        why = "another sample subset"
    if why:
        log.warning("%s: made with %s; computing the teacher's figure arrays", path, why)
        return None
    return {"teacher_levels": got["teacher_levels"].astype(np.float32), "difficulty": got["difficulty"].astype(np.float32)}


# --------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------


def evaluate_model(params, model_dir: str | Path, data_root: str | Path, teacher_dir: str | Path,
                   device: torch.device | str = "cpu", figure_samples: int = 100, progress: bool = True,
                   *, teacher_figdata: str | Path | None = None,
                   timings: dict | None = None, figures: bool = True,
                   ranks_out: dict | None = None) -> tuple[dict, dict | None]:
    """Evaluate the model in `model_dir` (module docstring): returns `(metrics, figdata)`, metrics a
    flat dict with sorted keys of plain floats / ints / strings, figdata a dict of numpy arrays for a
    CMAPKD model or the teacher and None otherwise.

    `params` needs `seed`, `model`, `evaluate` and, for CMAPKD models, `loss`, `distill` and
    `lambda1..4`. Everything runs under `torch.inference_mode` except the probe's training.
    `teacher_figdata`: the teacher's own figdata file; when it matches (same teacher weights, data
    and subset) a CMAPKD model takes `teacher_levels` and `difficulty` from it instead of running
    the teacher (identical values, a few seconds saved per model). `timings`: a dict to receive the
    seconds spent per part (load, retrieval, zeroshot, vqa_probe, efficiency, figdata, total).
    `figures=False`: skip the figure arrays (figdata is None), e.g. when nobody saves them.
    `ranks_out`: a dict to receive the per-query retrieval ranks (`i2t_rank`, `t2i_rank`,
    `text_to_image`), which paired comparisons between models resample (cmapkd.report.stats)."""
    t_start = time.perf_counter()
    ev = params.evaluate
    device = torch.device(device)
    data_root, teacher_dir = Path(data_root), Path(teacher_dir)
    times: dict[str, float] = {}

    def lap(part: str, t0: float) -> float:
        now = time.perf_counter()
        times[part] = now - t0
        return now

    t0 = time.perf_counter()
    loaded = load_model(params, model_dir, teacher_dir, device)
    model = loaded.encoder
    test = ImageTextDataset(data_root, "test")
    t0 = lap("load", t0)

    img = embed_images(model, test.images, ev.batch_size, device, progress=progress, desc="test images")
    txt = embed_texts(model, test.flat_captions(), ev.batch_size, device, progress, "test captions")
    metrics: dict = {"model": loaded.name, "method": loaded.method, "seed": int(loaded.seed)}
    metrics.update(retrieval_metrics(img, txt, test.text_to_image(), ranks_out))
    metrics.update(health_metrics(img, txt))
    t0 = lap("retrieval", t0)

    metrics.update(zeroshot_metrics(model, data_root, ev.zeroshot, ev.batch_size, device, progress))
    t0 = lap("zeroshot", t0)

    metrics.update(vqa_probe_metrics(model, data_root, ev.vqa_probe, ev.batch_size, device,
                                     {"test": (test, img)}, progress))
    t0 = lap("vqa_probe", t0)

    metrics.update(efficiency_metrics(model, test, ev.latency, device))
    t0 = lap("efficiency", t0)

    figdata = None
    if figures and (loaded.is_teacher or loaded.method == "cmapkd"):
        idx = figure_subset(len(test), figure_samples, ev.figure_seed)
        teacher_sha = str((teacher_spec(teacher_dir).get("identity") or {}).get("weights_sha256", ""))
        digest = str(read_info(data_root).get("digest", ""))
        figdata = sample_annotations(test, idx)
        figdata["teacher_sha256"] = np.array(teacher_sha)
        figdata["data_digest"] = np.array(digest)
        if loaded.is_teacher:
            figdata.update(teacher_figure_arrays(model, test, idx, ev.batch_size, device))
        else:
            reused = None
            if teacher_figdata is not None and Path(teacher_figdata).is_file():
                reused = _reuse_teacher_arrays(Path(teacher_figdata), idx, teacher_sha, digest)
            if reused is None:
                from cmapkd.distill.teacher import load_teacher

                teacher = load_teacher(params.model, teacher_dir).to(device)
                t_arr = teacher_figure_arrays(teacher, test, idx, ev.batch_size, device)
                reused = {k: t_arr[k] for k in ("teacher_levels", "difficulty")}
                del teacher
            figdata.update(reused)
            figdata.update(cmapkd_figure_arrays(loaded.distiller, test, idx, ev.batch_size, device))
        figdata["crossmodal_sim_mean"] = figdata["crossmodal_sim"].mean(axis=0).astype(np.float32)
        figdata = dict(sorted(figdata.items()))
    lap("figdata", t0)
    times["total"] = time.perf_counter() - t_start
    if timings is not None:
        timings.update(times)
    metrics = {k: _plain(v) for k, v in sorted(metrics.items())}
    return metrics, figdata


def _plain(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if isinstance(v, str):
        return v
    raise TypeError(f"metric value {v!r} of type {type(v).__name__} is not a float, int or str")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def metrics_json(metrics: dict) -> str:
    return json.dumps(metrics, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_metrics(path: str | Path, metrics: dict) -> None:
    from cmapkd.data.store import atomic_write_bytes

    atomic_write_bytes(Path(path), metrics_json(metrics).encode("utf-8"))


def figdata_bytes(figdata: dict[str, np.ndarray]) -> bytes:
    """An .npz (readable with `np.load(..., allow_pickle=False)`) with fixed member order and
    timestamps, so the same arrays always give the same bytes (np.savez stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for key in sorted(figdata):
            arr = np.asarray(figdata[key])
            if arr.dtype.kind == "O":
                raise TypeError(f"figdata '{key}': object arrays need pickle; use str or numeric arrays")
            member = io.BytesIO()
            np.lib.format.write_array(member, np.array(arr, order="C"), allow_pickle=False)  # keeps 0-d arrays 0-d
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def save_figdata(path: str | Path, figdata: dict[str, np.ndarray]) -> None:
    from cmapkd.data.store import atomic_write_bytes

    atomic_write_bytes(Path(path), figdata_bytes(figdata))


__all__ = [
    "CMAPKD_FIGDATA_KEYS",
    "EFFICIENCY_KEYS",
    "EvaluationError",
    "HEALTH_KEYS",
    "FIGDATA_DOC",
    "IDENTITY_KEYS",
    "LoadedModel",
    "RETRIEVAL_KEYS",
    "TEACHER_FIGDATA_KEYS",
    "TIMING_KEYS",
    "VQA_KEYS",
    "cmapkd_figure_arrays",
    "efficiency_metrics",
    "embed_images",
    "embed_texts",
    "evaluate_model",
    "figdata_bytes",
    "figure_subset",
    "fraction_keys",
    "is_teacher_dir",
    "load_model",
    "metric_keys",
    "metrics_json",
    "retrieval_metrics",
    "save_figdata",
    "teacher_figure_arrays",
    "tower_params",
    "vqa_probe_metrics",
    "write_metrics",
    "zeroshot_keys",
    "zeroshot_metrics",
]
