"""Distributed helpers: torchrun environment, gloo on CPU / nccl on CUDA, single process otherwise.

Every helper is a no-op (or the identity) when no process group is initialised, so the same training
code runs in one process without ``torch.distributed`` (the official AFA code's SyncBN needed it).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return get_rank() == 0


def init_distributed(device: str | None = None, backend: str | None = None,
                     timeout_s: float = 1800.0) -> DistInfo:
    """Initialise from torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (+ ``MASTER_ADDR/PORT``).

    device: "cuda" / "cpu"; default CUDA when available. backend: default nccl on CUDA, gloo on CPU.
    Without ``WORLD_SIZE`` > 1 in the environment, returns a single-process DistInfo and initialises
    nothing. Idempotent when a group already exists.
    """
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"), init_method="env://",
                                rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    if is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device of a ``--device`` value (default: CUDA when available, else the CPU), checked now:
    a misspelt name or a device this torch build or machine lacks is a ``ValueError`` saying so."""
    if name is None or name == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device '{name}' (use cpu, cuda or cuda:N)") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device '{name}' is not available: {build} (torch {torch.__version__}); "
                             f"use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device '{name}' is not available: {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu" and dev.type not in ("mps", "xpu"):
        raise ValueError(f"unsupported device '{name}' (use cpu, cuda or cuda:N)")
    return dev


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place and return it (identity in a single process)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled by torch.distributed; only for trusted peers)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def convert_sync_bn(model: nn.Module, device: torch.device | str) -> nn.Module:
    """SyncBatchNorm only on CUDA with world size > 1 (it raises on CPU modules); otherwise unchanged."""
    if torch.device(device).type == "cuda" and get_world_size() > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int, rank: int | None = None) -> int:
    """Seed Python, numpy and torch (all devices) with ``seed + rank`` and return that seed.

    Per-rank seeds: the official code used the same seed on every rank, so random crops repeated
    across ranks. rank defaults to the current process-group rank (0 without one).
    """
    s = int(seed) + (get_rank() if rank is None else int(rank))
    random.seed(s)
    np.random.seed(s % 2**32)  # noqa: NPY002 - legacy global RNG used by data code
    torch.manual_seed(s)  # also seeds every CUDA device
    return s


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads for torch's operators (None: leave torch's default, one per core).

    On a machine where other processes keep the cores busy, fewer threads than cores (often 1) run
    much faster than the default, which makes every thread wait for the slowest core.
    """
    if threads is None:
        return
    n = int(threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(n)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive numpy / random seeds from the worker's torch seed, which
    differs per worker, epoch and (after :func:`seed_everything`) rank."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)  # noqa: NPY002
    random.seed(s)
