"""Data-parallel training on ``torch.distributed``: the process group, and the collectives LMPPO needs.

Launch with ``torchrun`` (or ``lm-gym train --nproc K``): every process is one rank with its own shard
of the env rows; :class:`agents.ppo.LMPPO` averages gradients with
:class:`~torch.nn.parallel.DistributedDataParallel` and makes its rollout statistics (reward normalisation,
KL, logs) global. Without a process group every function here is the single-process identity.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def setup() -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1); True when joined.

    The backend is NCCL when CUDA is available (each rank on GPU ``LOCAL_RANK``), else gloo.
    """
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=1))
    return True


def active() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this process logs, checkpoints and exports (rank 0)."""
    return rank() == 0


def gather(values: torch.Tensor) -> torch.Tensor:
    """The 1-D ``values`` of every rank, concatenated in rank order (sizes may differ), on the host."""
    values = values.detach().reshape(-1).cpu()
    if not active():
        return values
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, values)
    return torch.cat(parts)


def gather_objects(items: list) -> list:
    """The lists ``items`` of every rank (picklable objects), concatenated in rank order."""
    if not active():
        return list(items)
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def every(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (``flag`` itself without a process group)."""
    return bool(gather(torch.tensor([bool(flag)])).all())


def broadcast(value):
    """Rank 0's ``value`` (any picklable object), on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank."""
    if active():
        dist.barrier()
