"""Runtime helpers shared by every stage: seeding, device selection, offline mode, logging."""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Callable
from typing import NoReturn

import numpy as np

DEVICE_ENV = "CMAPKD_DEVICE"
HUB_ENV = "CMAPKD_ALLOW_HUB"
KEEP_FREED_ENV = "CMAPKD_KEEP_FREED_MEMORY"
# glibc's malloc tunables (read once, when a process starts): no mmap for large blocks, and never
# hand the top of the heap back to the kernel, so a freed block is reused by the next allocation
KEEP_FREED_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}

log = logging.getLogger("cmapkd")


def keep_freed_memory_env(env=os.environ) -> dict[str, str] | None:
    """The environment a `cmapkd <stage>` process restarts itself in so that glibc keeps the memory
    torch frees, or None when no restart is needed (already set, set otherwise by the user, or
    turned off with CMAPKD_KEEP_FREED_MEMORY=0).

    Why: glibc serves every block of 32 MB or more with its own mmap and unmaps it when torch frees
    it, so the large activations of every forward pass are faulted in again, 4 KB at a time, on
    every batch. On this project's 2-core machines that is a large share of the work: the teacher's
    image tower at batch 64 spent about half its time in page faults (benchmarks/bench_alloc.py, docs/benchmarks.md). It
    changes where tensors live, never a value. glibc reads these variables only at process start,
    hence a restart of the command (cheap: before torch is imported) instead of `mallopt`."""
    if env.get(KEEP_FREED_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if any(k in env for k in KEEP_FREED_MALLOC_ENV):
        return None
    return {**env, **KEEP_FREED_MALLOC_ENV}


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch (all devices). `deterministic` also asks torch for deterministic kernels."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # deterministic mode also fills every new empty tensor with NaN, ~5% of a CPU training step
        # (docs/benchmarks.md); nothing here reads memory it has not written
        torch.utils.deterministic.fill_uninitialized_memory = False
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False
        # needed by cuBLAS for deterministic matmuls on CUDA >= 10.2
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def get_device(default: str = "auto") -> "torch.device":  # noqa: F821
    """The device comes from the environment, never from params (switching machines must not
    invalidate DVC stages). CMAPKD_DEVICE=auto|cpu|cuda|cuda:N|mps; auto picks CUDA when present."""
    import torch

    choice = os.environ.get(DEVICE_ENV, default).strip().lower() or "auto"
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError as e:
        raise ValueError(f"{DEVICE_ENV}={choice!r} is not a torch device (use auto, cpu, cuda, cuda:N or mps)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{DEVICE_ENV}={choice!r} but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{DEVICE_ENV}={choice!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def configure_hub(setting: str) -> bool:
    """The embedded default never touches a model hub: set the Hugging Face libraries offline so a
    lookup fails fast instead of hanging. The paper setting may download weights by tag, unless the
    user has set HF_HUB_OFFLINE themselves. CMAPKD_ALLOW_HUB=1 lifts the embedded default's rule.
    Returns True when the hub is switched off."""
    if setting == "embedded" and os.environ.get(HUB_ENV, "0") != "1":
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        return True
    return os.environ.get("HF_HUB_OFFLINE", "0") == "1"


def num_threads() -> int:
    """Threads for CPU work: all cores unless OMP_NUM_THREADS says otherwise."""
    env = os.environ.get("OMP_NUM_THREADS")
    return int(env) if env and env.isdigit() else max(1, os.cpu_count() or 1)


def run_stage(main: Callable[[], int | None]) -> NoReturn:
    """The `__main__` of `python -m cmapkd.stages.<stage>` and of `cmapkd <stage>` run in process
    (`cli.launch`; dvc.yaml runs `cmapkd <stage>`): run `main`, then end
    the process without the interpreter's teardown. With torch, open_clip and transformers loaded,
    that teardown (module finalizers and a last garbage collection of a large heap) takes about 1 s:
    more than a minute over the ~80 stage processes of a full `dvc repro`. Every file a stage
    writes is complete by then (atomic writes, DVCLive's end(), closed figures); logging and the
    standard streams are flushed here. An exception still propagates the normal way (traceback,
    exit status 1); library calls of `main` (tests) are unaffected."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))
