"""The training runs of the pipeline: CMAPKD stages 1-4 (METHOD.md section 5) and the scratch
baseline, each one DVC stage. A run builds its method, initialises it from the previous stage,
feeds the shared training loop and saves the trained state (safetensors) plus a summary with the
validation retrieval it measured."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cmapkd.config import AblationVariant, to_dict
from cmapkd.data import ImageTextDataset
from cmapkd.distill.baselines import BASELINES, baseline_lrs, build_baseline
from cmapkd.distill.batches import DistillBatches, cache_identity
from cmapkd.distill.cache import IDENTITY_FILE, CacheReader
from cmapkd.distill.cmapkd import CMAPKDDistiller
from cmapkd.distill.ddp import DistInfo
from cmapkd.distill.teacher import load_teacher, recorded_identity
from cmapkd.distill.trainer import TrainSpec, spec_fingerprint, train
from cmapkd.eval.retrieval import flatten_retrieval, recall_at_k
from cmapkd.losses.cmapkd import TERMS
from cmapkd.models.encoders import DualEncoder, build_encoder
from cmapkd.models.ucmp import TeacherDims

log = logging.getLogger("cmapkd.runs")

CMAPKD_STAGES = ("stage1", "stage2", "stage3", "stage4a", "stage4b")
PREVIOUS = {"stage2": "stage1", "stage3": "stage2", "stage4a": "stage3", "stage4b": "stage4a"}
RUNS = CMAPKD_STAGES + ("onestage",) + tuple(BASELINES)
ALL_LEVELS = [1, 2, 3, 4]


@dataclass(frozen=True)
class RunPlan:
    name: str
    method: str  # cmapkd | scratch | kd | ... (the summary's and the metrics' `method`)
    epochs: int
    lrs: dict
    vis_levels: list
    txt_levels: list
    level_weights: str  # uniform | alsn | manual
    phase: str  # distill | policy | joint
    terms: tuple = ()  # CMAPKD loss terms (params.loss.terms less the variant's drop_terms)


def student_epochs(d) -> int:
    """Epochs in which CMAPKD updates the student (stages 1-3 and 4b; 4a trains only the ALSN):
    the budget every baseline gets, so that all rows see the same number of student updates."""
    return d.stage1.epochs + d.stage2.epochs + d.stage3.epochs + d.stage4.joint_epochs


def _restrict(levels, allowed) -> list:
    kept = [lv for lv in levels if lv in allowed]
    return kept or sorted(allowed)


def plan(params, name: str, variant: AblationVariant | None = None) -> RunPlan:
    """What run `name` trains, for how long and how fast, under an optional ablation variant."""
    d = params.distill
    v = variant or AblationVariant()
    unknown = sorted(set(v.drop_terms) - set(TERMS))
    if unknown:
        raise ValueError(f"ablation drop_terms: unknown loss term(s) {unknown}; known: {list(TERMS)}")
    terms = tuple(t for t in params.loss.terms if t not in v.drop_terms)

    def levels(vis, txt):
        return _restrict(vis, v.vis_levels), _restrict(txt, v.txt_levels)

    if name in ("stage1", "stage2", "stage3"):
        s = getattr(d, name)
        # stages 1-3 train the student and its adapters with uniform level weights; the ALSN waits
        vis, txt = levels(s.vis_levels, s.txt_levels)
        return RunPlan(name, "cmapkd", s.epochs, {"student": s.lr, "adapters": s.lr, "alsn": 0.0},
                       vis, txt, "uniform", "distill", terms)
    if name in ("stage4a", "stage4b"):
        vis, txt = levels(ALL_LEVELS, ALL_LEVELS)
        s4 = d.stage4
        if name == "stage4a":
            return RunPlan(name, "cmapkd", s4.policy_epochs, {"student": 0.0, "adapters": 0.0, "alsn": s4.policy_lr},
                           vis, txt, v.level_weights, "policy", terms)
        return RunPlan(name, "cmapkd", s4.joint_epochs,
                       {"student": s4.lr_student, "adapters": s4.lr_adapters, "alsn": s4.lr_alsn},
                       vis, txt, v.level_weights, "joint", terms)
    if name == "onestage":
        # all levels and the ALSN from the first step, for as many steps as stages 1-4 together
        vis, txt = levels(ALL_LEVELS, ALL_LEVELS)
        epochs = student_epochs(d) + d.stage4.policy_epochs
        return RunPlan(name, "cmapkd", epochs, {"student": d.stage1.lr, "adapters": d.stage1.lr, "alsn": d.stage4.lr_alsn},
                       vis, txt, v.level_weights, "joint", terms)
    if name in BASELINES:
        return RunPlan(name, name, student_epochs(d), baseline_lrs(name, params), [], [], "uniform", "distill")
    raise ValueError(f"unknown run '{name}'; runs: {list(RUNS)}")


def chain(variant: AblationVariant) -> list[str]:
    """The CMAPKD runs of a variant, in order."""
    if variant.one_stage:
        return ["onestage"]
    # with fixed level weights stage 4a has nothing to train (the ALSN is not used)
    return [s for s in CMAPKD_STAGES if not (s == "stage4a" and variant.level_weights != "alsn")]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_state(module: torch.nn.Module, path: Path, metadata: dict | None = None) -> None:
    """safetensors of the trained state (the frozen teacher is never part of it), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def load_state(module: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint of the previous stage not found (run it first)")
    try:
        module.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{path}: does not fit this model: {e}") from e


@torch.inference_mode()
def evaluate_retrieval(student: DualEncoder, dataset: ImageTextDataset, batch_size: int, device: torch.device) -> dict:
    """Validation retrieval (CLIP_benchmark protocol: every caption counts) of a student."""
    was = student.training
    student.eval()
    img, txt = [], []
    n = len(dataset)
    for start in range(0, n, batch_size):
        x = torch.from_numpy(dataset.images[start : min(n, start + batch_size)].copy()).permute(0, 3, 1, 2)
        img.append(student.encode_image(x.to(device)).float().cpu())
    flat = dataset.flat_captions()
    for start in range(0, len(flat), batch_size):
        ids, mask = student.tokenize(flat[start : start + batch_size])
        txt.append(student.encode_text(ids.to(device), mask.to(device)).float().cpu())
    student.train(was)
    return flatten_retrieval(recall_at_k(torch.cat(img), torch.cat(txt), dataset.text_to_image()))


def build_student(params, init_dir: Path | None = None) -> DualEncoder:
    """The student a run starts from (METHOD.md 1): the `student_init` stage's encoder from
    `init_dir` (embedded: pretrained towers with heads aligned on them; paper: open_clip from its
    pretrained tag), or the bare `build_encoder` when `init_dir` is None (random heads; a stage
    that loads a full trained state next). Then `model.student.trainable_blocks` / `freeze_bn`
    decide which weights train."""
    from cmapkd.distill.teacher import TeacherError

    spec = params.model.student
    if init_dir is None:
        student = build_encoder(spec)
    else:
        try:
            student = load_teacher(spec, init_dir)  # strict: every head key, shapes, recorded identity
        except (TeacherError, FileNotFoundError) as e:
            raise type(e)(f"student init: {e} (the student's start is written by `dvc repro student_init`)") from e
        for prm in student.parameters():
            prm.requires_grad_(True)
        student.train()
    return student.set_trainable_blocks(spec.trainable_blocks, spec.freeze_bn)


def build_method(params, name: str, teacher: DualEncoder | None, teacher_dims: TeacherDims | None,
                 variant: AblationVariant | None = None, student_init: Path | None = None):
    p = plan(params, name, variant)
    student = build_student(params, student_init)
    if p.method != "cmapkd":
        return build_baseline(name, params, student, teacher=teacher, teacher_dims=teacher_dims)
    loss_cfg = dataclasses.replace(params.loss, vis_levels=p.vis_levels, txt_levels=p.txt_levels,
                                   level_weights=p.level_weights, terms=list(p.terms))
    lambdas = (params.lambda1, params.lambda2, params.lambda3, params.lambda4)
    method = CMAPKDDistiller(student, params.model, loss_cfg, lambdas, teacher=teacher, teacher_dims=teacher_dims)
    method.set_phase(p.phase)
    return method


def run(params, name: str, data_root: Path, teacher_dir: Path, cache_dir: Path | None, init_dir: Path | None,
        out_dir: Path, scratch_root: Path, live_root: Path | None, device: torch.device,
        dist_info: DistInfo = DistInfo(), progress: bool = True, seed: int | None = None,
        variant: AblationVariant | None = None, model_id: str | None = None,
        student_init: Path | None = None) -> dict:
    """Train run `name` and write `out_dir/model.safetensors` + `out_dir/summary.json`.

    `seed` is the training seed (sampling order, caption/view picks, initialisation); the data,
    the views and the teacher cache always belong to `params.seed`. `model_id` names the scratch
    and DVCLive folders (default: the out folder's name)."""
    p = plan(params, name, variant)
    d = params.distill
    seed = params.seed if seed is None else int(seed)
    model_id = model_id or Path(out_dir).name
    dataset = ImageTextDataset(data_root, "train")
    num_views = params.cache_teacher.num_views
    teacher, teacher_dims, cache = None, None, None
    needs_teacher = name != "scratch"
    if needs_teacher:
        if d.teacher_mode == "cached":
            if cache_dir is None:
                raise ValueError(f"{name}: distill.teacher_mode is 'cached' but no cache folder was given")
            ident = recorded_identity(params.model, teacher_dir) or load_teacher(params.model, teacher_dir).identity()
            expected = cache_identity(ident, data_root, "train", params.model.student.image_size, num_views, params.seed)
            cache = CacheReader(cache_dir, expected)
            teacher_dims = TeacherDims.from_targets({**cache.rows("image-v0", [0]), **cache.rows("text", [0])})
            # cached targets replace the teacher's forward pass: the teacher is never built
        else:
            teacher = load_teacher(params.model, teacher_dir).to(device)
    torch.manual_seed(seed)  # the initialisation of the student and the method's modules
    method = build_method(params, name, teacher, teacher_dims, variant, student_init)
    init_sha = ""
    if name in PREVIOUS:
        if init_dir is None:
            raise ValueError(f"{name}: starts from {PREVIOUS[name]}; give its output folder (--init)")
        init_path = Path(init_dir) / "model.safetensors"
        load_state(method, init_path)
        init_sha = file_sha256(init_path)
    method.to(device)
    batches = DistillBatches(dataset, method.student.tokenize, seed, num_views, cache=cache,
                             teacher_tokenize=teacher.tokenize if teacher is not None else None,
                             needs_targets=needs_teacher)
    extra = {
        "run": name,
        "params": {k: to_dict(getattr(params, k)) for k in ("seed", "model", "loss", "distill", "lambda1", "lambda2", "lambda3", "lambda4")},
        "plan": to_dict(dataclasses.asdict(p)),
        "baselines": to_dict(getattr(params, "baselines", None)) if p.method != "cmapkd" else None,
        "train_seed": seed,
        "init_sha": init_sha,
        "student_init": _student_init_digest(student_init),
        "cache": cache.meta["identity"] if cache is not None else None,
        "world_size": dist_info.world_size,
    }
    spec = TrainSpec(stage=f"{model_id}/{name}" if model_id != name else name, epochs=p.epochs, batch_size=d.batch_size,
                     lrs=p.lrs, weight_decay=d.weight_decay, warmup_frac=d.warmup_frac, grad_clip=d.grad_clip,
                     seed=seed, ckpt_every=d.ckpt_every)
    spec = dataclasses.replace(spec, fingerprint=spec_fingerprint(spec, extra))
    live_dir = Path(live_root) if live_root is not None else None
    result = train(method, len(dataset), batches, spec, device, Path(scratch_root) / model_id / name, live_dir,
                   dist_info, progress)
    summary = {"run": name, "model": model_id, "method": p.method, "seed": seed, "steps": result.steps,
               "epochs": p.epochs, "resumed_from": result.resumed_from, "fingerprint": spec.fingerprint,
               "vis_levels": p.vis_levels, "txt_levels": p.txt_levels, "level_weights": p.level_weights,
               "terms": list(p.terms), "final_losses": {k: v for k, v in result.final.items() if k.startswith("loss/")}}
    if dist_info.is_main:
        val = ImageTextDataset(data_root, "val")
        summary["val"] = evaluate_retrieval(method.student, val, d.eval_batch_size, device)
        save_state(method, Path(out_dir) / "model.safetensors", {"run": name, "method": p.method})
        (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        log.info("%s: val retrieval mean %.4f (i2t R@1 %.4f, t2i R@1 %.4f)", spec.stage, summary["val"]["retrieval_mean"],
                 summary["val"]["retrieval_i2t_r1"], summary["val"]["retrieval_t2i_r1"])
    return summary


def _student_init_digest(init_dir: Path | None) -> str:
    """Identity of the student's start (its spec.json records the weights digest)."""
    if init_dir is None:
        return ""
    spec = Path(init_dir) / "spec.json"
    return file_sha256(spec) if spec.is_file() else ""


def variant_changes_stage(params, variant: AblationVariant, name: str) -> bool:
    return name == "onestage" or plan(params, name, variant) != plan(params, name, AblationVariant())


def run_chain(params, variant_name: str, variant: AblationVariant, data_root: Path, teacher_dir: Path,
              cache_dir: Path | None, out_dir: Path, scratch_root: Path, live_root: Path | None, device: torch.device,
              main_chain: dict | None = None, dist_info: DistInfo = DistInfo(), progress: bool = True,
              student_init: Path | None = None) -> dict:
    """An ablation (seed `params.seed`): the CMAPKD runs of `variant` in one process.

    Stages whose plan the variant does not change are taken from the main chain (`main_chain`:
    run name -> its output folder, e.g. models/cmapkd-stage1-s0), so "uniform" only re-trains
    stage 4. Intermediate stages go to `scratch_root/<model>/out-<stage>` and are reused when
    the chain is run again after an interruption (same params, init weights and teacher cache);
    the last one is written to `out_dir`, and a finished chain removes the intermediate ones."""
    model_id = Path(out_dir).name
    runs = chain(variant)
    start = next((i for i, n in enumerate(runs) if variant_changes_stage(params, variant, n)), len(runs) - 1)
    prev_dir = None
    if start > 0:
        prev_dir = (main_chain or {}).get(runs[start - 1])
        if prev_dir is None:
            raise ValueError(f"ablation '{variant_name}': starts at {runs[start]} and needs the main chain's "
                             f"{runs[start - 1]} output")
    summary: dict = {}
    for name in runs[start:]:
        last = name == runs[-1]
        stage_out = Path(out_dir) if last else Path(scratch_root) / model_id / f"out-{name}"
        live = Path(live_root) / name if live_root is not None else None
        key = _reuse_key(params, name, variant, prev_dir, cache_dir)
        done = stage_out / "summary.json"
        if not last and done.is_file() and json.loads(done.read_text()).get("reuse_key") == key:
            log.info("%s/%s: finished earlier in %s, reusing it", model_id, name, stage_out)
            summary = json.loads(done.read_text())
        else:
            summary = run(params, name, data_root, teacher_dir, cache_dir, prev_dir, stage_out, scratch_root, live,
                          device, dist_info, progress, None, variant, model_id, student_init)
            summary["reuse_key"] = key
            if dist_info.is_main:
                done.write_text(json.dumps(summary, indent=2, sort_keys=True))
        prev_dir = stage_out
    summary.update(ablation=variant_name, chain=runs, started_at=runs[start], model=model_id)
    if dist_info.is_main:
        (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        # the intermediate stages only serve a resume after an interruption: a finished chain leaves
        # none behind, so a later run (after a code change, say) never reuses them
        for name in runs[start:-1]:
            shutil.rmtree(Path(scratch_root) / model_id / f"out-{name}", ignore_errors=True)
    return summary


def _reuse_key(params, name: str, variant: AblationVariant, init_dir, cache_dir=None) -> str:
    ident = Path(cache_dir) / IDENTITY_FILE if cache_dir is not None else None
    blob = {"plan": to_dict(dataclasses.asdict(plan(params, name, variant))),
            "init": file_sha256(Path(init_dir) / "model.safetensors") if init_dir else "",
            "cache": file_sha256(ident) if ident is not None and ident.is_file() else "",
            "params": {k: to_dict(getattr(params, k)) for k in ("seed", "model", "loss", "distill", "lambda1",
                                                               "lambda2", "lambda3", "lambda4")}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]
