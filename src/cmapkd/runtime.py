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

log = logging.getLogger("cmapkd")


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
