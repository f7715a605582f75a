"""Process-group setup from torchrun's environment, and DDP applied from outside the model.

Design decisions:
- The GPT knows nothing of parallelism (torchtitan's rule): :func:`parallelize` wraps it,
  and the trainer keeps the unwrapped module for checkpoints, so no ``module.`` or
  ``_orig_mod.`` prefixes ever reach a state dict.
- nccl on GPUs, gloo on CPU: the same code runs the 2-process CPU test in CI and an
  8-GPU node. Without torchrun (``WORLD_SIZE`` unset or 1) no process group is created.
- The rank/world helpers answer 0/1 when there is no process group, so single-process
  code paths need no special cases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, rank on its node, world size, and its device."""

    rank: int
    local_rank: int
    world: int
    device: torch.device


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world=world, device=device)


def cleanup() -> None:
    """Leave the process group (if any); torchrun expects every rank to do so before exiting."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def parallelize(model: nn.Module, device: torch.device, compile: bool = False) -> nn.Module:
    """Move to ``device``, wrap in DDP when there is more than one process, optionally compile.

    Returns the module to run forward/backward on; callers keep their reference to the
    unwrapped model, whose parameters DDP and the compiled module share, so checkpoints
    never see ``module.`` or ``_orig_mod.`` prefixes. Compiling after DDP lets dynamo
    split the graph at DDP's bucket boundaries (overlapping all-reduce with backward).
    """
    model.to(device)
    wrapped = model if world_size() == 1 else DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(wrapped) if compile else wrapped


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (gloo has no AVG, so means are sums divided by the world)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Max over ranks, in place: how ranks agree that any one of them wants to stop."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
