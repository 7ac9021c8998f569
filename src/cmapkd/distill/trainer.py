"""One training loop for every method (CMAPKD stages, baselines, ablations).

A method is an `nn.Module` with
- `compute_features(batch) -> dict[str, Tensor]`: batch-first tensors for the local batch;
- `compute_losses(features) -> dict[str, Tensor]`: named, weighted terms plus `total`; keys that
  start with `diag/` are detached diagnostics (ALSN weight statistics, ...), logged but not summed;
- `param_groups(lrs: dict[str, float]) -> list[dict]`: optimizer groups named `student`,
  `adapters`, `alsn`, ... (a group whose lr is 0 is frozen).

The loop: AdamW with per-group learning rates, cosine decay after a linear warm-up, gradient
clipping, bf16 autocast on CUDA, DVCLive logging (every loss term, the learning rates and the
diagnostics), a tqdm progress bar, atomic checkpoints in a scratch folder at a fixed step
interval, and resume: a stage killed at any point (SIGKILL included) and run again continues
from the last checkpoint and ends with the same weights and the same logged metrics as an
uninterrupted run, because the data order, the views and every RNG state are functions of
(seed, epoch, step) or restored from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

from cmapkd.distill.ddp import DistInfo, average_gradients, barrier, gather_features

log = logging.getLogger("cmapkd.train")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the stage, the step and the term."""


@dataclass(frozen=True)
class TrainSpec:
    stage: str
    epochs: int
    batch_size: int  # global batch over all ranks
    lrs: dict[str, float]  # optimizer group -> peak learning rate (0: frozen)
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 50  # steps; 0 = never
    log_every: int = 1
    workers: int = 0
    fingerprint: str = ""  # identity of everything that determines the run (params, init weights, data)


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1, then cosine decay to `min_ratio`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _rng_state() -> dict:
    """Every RNG state as tensors and plain Python values, so that the checkpoint loads with
    `torch.load(weights_only=True)` (no pickled numpy objects)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss if gauss is None else float(gauss)},
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill mid-write leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def spec_fingerprint(spec: TrainSpec, extra: dict | None = None) -> str:
    payload = json.dumps({"spec": asdict(spec), "extra": extra or {}}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


class _Live:
    """DVCLive wrapper that can replay the logged history after a resume (only rank 0 writes)."""

    def __init__(self, live_dir: Path | None, enabled: bool):
        self.live = None
        if live_dir is not None and enabled:
            from dvclive import Live

            # resume=False wipes earlier logs; a resumed run replays its history from the checkpoint
            self.live = Live(str(live_dir), resume=False, dvcyaml=False, save_dvc_exp=False, report=None)

    def log(self, step: int, row: dict) -> None:
        if self.live is None:
            return
        self.live.step = step
        for k, v in row.items():
            if k != "step":
                self.live.log_metric(k, v)
        self.live.next_step()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


def train(
    method: torch.nn.Module,
    num_samples: int,
    make_batch: Callable[[list[int], int], dict],
    spec: TrainSpec,
    device: torch.device,
    scratch_dir: Path,
    live_dir: Path | None = None,
    dist_info: DistInfo = DistInfo(),
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train `method` in place. `make_batch(indices, epoch)` builds the batch dict for dataset rows
    `indices` (deterministically from the indices and the epoch). `stop_after_steps` ends early
    (used by tests to simulate an interruption)."""
    W = dist_info.world_size
    if spec.batch_size % W:
        raise ValueError(f"{spec.stage}: batch_size {spec.batch_size} is not divisible by {W} ranks")
    local_bs = spec.batch_size // W
    sampler = DistributedSampler(
        range(num_samples), num_replicas=W, rank=dist_info.rank, shuffle=True, seed=spec.seed, drop_last=True
    )
    steps_per_epoch = len(sampler) // local_bs
    if steps_per_epoch == 0:
        raise ValueError(f"{spec.stage}: {num_samples} samples are fewer than one batch of {spec.batch_size}")
    total_steps = steps_per_epoch * spec.epochs
    warmup = int(round(spec.warmup_frac * total_steps))

    groups = [g for g in method.param_groups(spec.lrs) if g["lr"] > 0]
    for g in method.param_groups(spec.lrs):
        if g["lr"] <= 0:
            for p in g["params"]:
                p.requires_grad_(False)
    for g in groups:
        g["initial_lr"] = g["lr"]
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=groups[0]["lr"] if groups else 0.0, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, total_steps, warmup, spec.min_lr_ratio)
    )

    fingerprint = spec.fingerprint or spec_fingerprint(spec)
    ckpt_path = Path(scratch_dir) / "last.pt"
    step, history, resumed_from = 0, [], 0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") == fingerprint:
            method.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            step, history = state["step"], state["history"]
            resumed_from = step
            log.info("%s: resuming from %s at step %d/%d", spec.stage, ckpt_path, step, total_steps)
        else:
            log.warning("%s: ignoring %s: it belongs to another run (params, data or init changed)", spec.stage, ckpt_path)

    live = _Live(live_dir, dist_info.is_main)
    for row in history:
        live.log(row["step"], row)

    use_amp = device.type == "cuda"
    method.train()
    bar = None
    if progress and dist_info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=spec.stage, unit="step", dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    try:
        while step < total_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch)
            order = list(sampler)
            indices = order[in_epoch * local_bs : (in_epoch + 1) * local_bs]
            batch = make_batch(indices, epoch)
            batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                feats = method.compute_features(batch)
                feats = gather_features(feats, dist_info)
                losses = method.compute_losses(feats)
            for name, value in losses.items():
                if not name.startswith("diag/") and not torch.isfinite(value).all():
                    raise NonFiniteLossError(
                        f"stage '{spec.stage}', step {step + 1}: loss term '{name}' is {value.item()}"
                    )
            used_lrs = {g.get("name", f"group{i}"): pg["lr"] for i, (g, pg) in enumerate(zip(groups, optimizer.param_groups))}
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            average_gradients(params, dist_info)
            if spec.grad_clip > 0 and params:
                torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            optimizer.step()
            scheduler.step()
            student = getattr(method, "student", None)
            if student is not None and hasattr(student, "logit_scale"):
                with torch.no_grad():  # open_clip clamps the learned temperature at 100
                    student.logit_scale.clamp_(0, math.log(100))
            step += 1
            seen += spec.batch_size

            if step % spec.log_every == 0 or step == total_steps:
                row = {"step": step, "epoch": epoch}
                row.update({f"loss/{k}" if not k.startswith("diag/") else k: float(v.detach()) for k, v in losses.items()})
                row.update({f"lr/{name}": lr for name, lr in used_lrs.items()})
                history.append(row)
                live.log(step, row)
            if bar is not None:
                rate = seen / max(1e-9, time.perf_counter() - t0)
                bar.set_postfix(loss=f"{float(losses['total'].detach()):.4f}", samples_s=f"{rate:.0f}")
                bar.update(1)
            if spec.ckpt_every and step % spec.ckpt_every == 0 and step < total_steps:
                if dist_info.is_main:
                    save_atomic(
                        {
                            "fingerprint": fingerprint,
                            "model": method.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "rng": _rng_state(),
                            "step": step,
                            "history": history,
                        },
                        ckpt_path,
                    )
                barrier(dist_info)
            if stop_after_steps is not None and step >= stop_after_steps:
                break
    finally:
        if bar is not None:
            bar.close()
        live.close()
    if step >= total_steps and dist_info.is_main and ckpt_path.parent.is_dir():
        # a finished run leaves no checkpoint behind, so a later run never "resumes" past its end
        shutil.rmtree(ckpt_path.parent, ignore_errors=True)
    return TrainResult(steps=step, history=history, resumed_from=resumed_from)
