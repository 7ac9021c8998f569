"""Data parallelism under `torchrun`: process group set-up, feature gathering and gradient averaging.

Every training method splits a step into `compute_features(batch)` (per-sample tensors, run on the
local shard of the global batch) and `compute_losses(features)`. Between the two, the features of
all ranks are gathered *with gradients* (open_clip's `gather_with_grad`), so every rank computes the
loss of the whole global batch, in-batch negatives and relation terms included. After backward the
gradients are averaged across ranks, which is what DistributedDataParallel's all-reduce does. With
gathered gradients summed over ranks (W x dL/dz_local) and then averaged (1/W), the update equals a
single process on the global batch. We do not wrap the module in `DistributedDataParallel` because
the losses use parameters (logit scale, ALSN, adapters) after the cross-rank gather, outside the
module's forward, which DDP's reducer does not support.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise.
    NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_features(features: dict[str, torch.Tensor], info: DistInfo) -> dict[str, torch.Tensor]:
    """Concatenate every batch-first tensor across ranks along dim 0, keeping gradients."""
    if not info.enabled:
        return features
    import torch.distributed.nn as dist_nn

    out = {}
    for key, value in features.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            out[key] = torch.cat(dist_nn.all_gather(value.contiguous()), dim=0)
        else:
            out[key] = value
    return out


def average_gradients(parameters: list[torch.nn.Parameter], info: DistInfo) -> None:
    """All-reduce and average the gradients of `parameters` (one flat buffer, as DDP's buckets)."""
    if not info.enabled:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
