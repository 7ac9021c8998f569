"""Efficiency: parameters, FLOPs and latency (ANCHORS.md section 5).

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode`, as open_clip's
`docs/model_profile.csv` was: 2 FLOPs per multiply-add (halve to compare with MACs, e.g.
TinyCLIP's GMACs); only matmul/convolution/attention-like ops are counted, not bias additions,
norms or activations. Latency is the median wall time of `repeats` calls after `warmup` calls,
under `torch.inference_mode`, with CUDA synchronised around each call; the device string and the
torch CPU thread count are recorded, since both change the numbers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _batch_size(inputs: Sequence) -> int:
    for x in inputs:
        if torch.is_tensor(x) and x.ndim > 0:
            return int(x.shape[0])
    raise ValueError("no tensor input with a batch dimension; pass batch_size explicitly")


@dataclass(frozen=True)
class FlopCount:
    total: int  # FLOPs of one call on the whole batch, 2 per multiply-add
    batch_size: int

    @property
    def per_item(self) -> float:
        return self.total / self.batch_size


def count_flops(fn: Callable, *inputs, batch_size: int | None = None) -> FlopCount:
    """FLOPs of `fn(*inputs)` under inference mode; per item = total / batch size (the first
    tensor input's first dimension unless `batch_size` is given)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return FlopCount(total=int(counter.get_total_flops()), batch_size=batch_size or _batch_size(inputs))


@dataclass(frozen=True)
class LatencyResult:
    median_ms: float  # per call (one whole batch)
    throughput: float  # items per second = batch_size / median seconds
    batch_size: int
    device: str
    num_threads: int  # torch.get_num_threads() during the measurement
    warmup: int
    repeats: int
    times_ms: tuple[float, ...]

    def as_dict(self) -> dict:
        return asdict(self)


def _device_of(inputs: Sequence) -> torch.device:
    for x in inputs:
        if torch.is_tensor(x):
            return x.device
    return torch.device("cpu")


def measure_latency(
    fn: Callable,
    inputs: Sequence,
    warmup: int = 5,
    repeats: int = 20,
    batch_size: int | None = None,
) -> LatencyResult:
    """Median latency of `fn(*inputs)`. The device is taken from the first tensor input (put the
    model and inputs on the device to measure)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    inputs = tuple(inputs)
    device = _device_of(inputs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync(device)
            start = time.perf_counter()
            fn(*inputs)
            sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(times)
    n = batch_size or _batch_size(inputs)
    name = str(device)
    if device.type == "cuda":
        name = f"{device} ({torch.cuda.get_device_name(device)})"
    return LatencyResult(median_ms=median, throughput=n / (median / 1e3), batch_size=n, device=name,
                         num_threads=torch.get_num_threads(), warmup=warmup, repeats=repeats, times_ms=tuple(times))
