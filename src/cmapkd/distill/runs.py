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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cmapkd.config import to_dict
from cmapkd.data import ImageTextDataset
from cmapkd.distill.baselines import ScratchStudent
from cmapkd.distill.batches import DistillBatches, cache_identity
from cmapkd.distill.cache import CacheReader
from cmapkd.distill.cmapkd import CMAPKDDistiller
from cmapkd.distill.ddp import DistInfo
from cmapkd.distill.teacher import load_teacher
from cmapkd.distill.trainer import TrainSpec, spec_fingerprint, train
from cmapkd.eval.retrieval import flatten_retrieval, recall_at_k
from cmapkd.models.encoders import DualEncoder, build_encoder
from cmapkd.models.ucmp import TeacherDims

log = logging.getLogger("cmapkd.runs")

RUNS = ("stage1", "stage2", "stage3", "stage4a", "stage4b", "scratch")
PREVIOUS = {"stage2": "stage1", "stage3": "stage2", "stage4a": "stage3", "stage4b": "stage4a"}


@dataclass(frozen=True)
class RunPlan:
    name: str
    epochs: int
    lrs: dict
    vis_levels: list
    txt_levels: list
    level_weights: str  # uniform | alsn
    phase: str  # distill | policy | joint


def plan(params, name: str) -> RunPlan:
    d = params.distill
    if name in ("stage1", "stage2", "stage3"):
        s = getattr(d, name)
        # stages 1-3 train the student and its adapters with uniform level weights; the ALSN waits
        return RunPlan(name, s.epochs, {"student": s.lr, "adapters": s.lr, "alsn": 0.0},
                       list(s.vis_levels), list(s.txt_levels), "uniform", "distill")
    if name == "stage4a":
        return RunPlan(name, d.stage4.policy_epochs, {"student": 0.0, "adapters": 0.0, "alsn": d.stage4.policy_lr},
                       [1, 2, 3, 4], [1, 2, 3, 4], "alsn", "policy")
    if name == "stage4b":
        s4 = d.stage4
        return RunPlan(name, s4.joint_epochs, {"student": s4.lr_student, "adapters": s4.lr_adapters, "alsn": s4.lr_alsn},
                       [1, 2, 3, 4], [1, 2, 3, 4], "alsn", "joint")
    if name == "scratch":
        # as many student-updating epochs as CMAPKD's stages 1-3 + 4b (4a trains only the ALSN)
        epochs = d.stage1.epochs + d.stage2.epochs + d.stage3.epochs + d.stage4.joint_epochs
        return RunPlan(name, epochs, {"student": d.scratch_lr}, [], [], "uniform", "distill")
    raise ValueError(f"unknown run '{name}'; runs: {RUNS}")


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


def build_method(params, name: str, teacher: DualEncoder | None, teacher_dims: TeacherDims | None):
    if name == "scratch":
        return ScratchStudent(build_encoder(params.model.student))
    p = plan(params, name)
    loss_cfg = dataclasses.replace(params.loss, vis_levels=p.vis_levels, txt_levels=p.txt_levels, level_weights=p.level_weights)
    lambdas = (params.lambda1, params.lambda2, params.lambda3, params.lambda4)
    method = CMAPKDDistiller(build_encoder(params.model.student), params.model, loss_cfg, lambdas,
                             teacher=teacher, teacher_dims=teacher_dims)
    method.set_phase(p.phase)
    return method


def run(params, name: str, data_root: Path, teacher_dir: Path, cache_dir: Path | None, init_dir: Path | None,
        out_dir: Path, scratch_root: Path, live_root: Path | None, device: torch.device,
        dist_info: DistInfo = DistInfo(), progress: bool = True) -> dict:
    """Train run `name` and write `out_dir/model.safetensors` + `out_dir/summary.json`."""
    p = plan(params, name)
    d = params.distill
    dataset = ImageTextDataset(data_root, "train")
    num_views = params.cache_teacher.num_views
    teacher, teacher_dims, cache = None, None, None
    needs_teacher = name != "scratch"
    if needs_teacher:
        teacher = load_teacher(params.model, teacher_dir)
        if d.teacher_mode == "cached":
            if cache_dir is None:
                raise ValueError(f"{name}: distill.teacher_mode is 'cached' but no cache folder was given")
            expected = cache_identity(teacher.identity(), data_root, "train", params.model.student.image_size,
                                      num_views, params.seed)
            cache = CacheReader(cache_dir, expected)
            teacher_dims = TeacherDims.from_targets({**cache.rows("image-v0", [0]), **cache.rows("text", [0])})
            teacher = None  # cached targets replace the teacher's forward pass
        else:
            teacher = teacher.to(device)
    method = build_method(params, name, teacher, teacher_dims)
    init_sha = ""
    if name in PREVIOUS:
        init_path = Path(init_dir) / "model.safetensors"
        load_state(method, init_path)
        init_sha = file_sha256(init_path)
    method.to(device)
    batches = DistillBatches(dataset, method.student.tokenize, params.seed, num_views, cache=cache,
                             teacher_tokenize=teacher.tokenize if teacher is not None else None,
                             needs_targets=needs_teacher)
    extra = {
        "run": name,
        "params": {k: to_dict(getattr(params, k)) for k in ("seed", "model", "loss", "distill", "lambda1", "lambda2", "lambda3", "lambda4")},
        "init_sha": init_sha,
        "cache": cache.meta["identity"] if cache is not None else None,
        "world_size": dist_info.world_size,
    }
    spec = TrainSpec(stage=name, epochs=p.epochs, batch_size=d.batch_size, lrs=p.lrs, weight_decay=d.weight_decay,
                     warmup_frac=d.warmup_frac, grad_clip=d.grad_clip, seed=params.seed, ckpt_every=d.ckpt_every)
    spec = dataclasses.replace(spec, fingerprint=spec_fingerprint(spec, extra))
    live_dir = Path(live_root) / name if live_root is not None else None
    result = train(method, len(dataset), batches, spec, device, Path(scratch_root) / name, live_dir, dist_info, progress)
    summary = {"run": name, "steps": result.steps, "epochs": p.epochs, "resumed_from": result.resumed_from,
               "final_losses": {k: v for k, v in result.final.items() if k.startswith("loss/")}}
    if dist_info.is_main:
        val = ImageTextDataset(data_root, "val")
        summary["val"] = evaluate_retrieval(method.student, val, d.eval_batch_size, device)
        save_state(method, Path(out_dir) / "model.safetensors", {"run": name})
        (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        log.info("%s: val retrieval mean %.4f (i2t R@1 %.4f, t2i R@1 %.4f)", name, summary["val"]["retrieval_mean"],
                 summary["val"]["retrieval_i2t_r1"], summary["val"]["retrieval_t2i_r1"])
    return summary
