"""Data-parallel training with PyTorch's own engine: torchrun + DistributedDataParallel.

``torchrun --nproc_per_node N [--nnodes M ...] -m mail_ros.cli train ...`` starts N processes
per node; each reads its rank from the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), and :func:`init_from_env` joins the process
group: NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU. Without those
variables training runs in one process, as before.

What stays the same as one process (see :class:`mail_ros.train.trainer.Trainer`): ``batch_size``
is the GLOBAL batch, split evenly over the ranks, so steps per epoch, the learning-rate schedule
and the batches themselves do not depend on the number of processes; rank 0 alone writes
checkpoints, logs and TensorBoard; every rank holds the same weights (DDP averages gradients and
broadcasts buffers), hence the same EMA, and validation is the mean over all validation windows,
sharded and summed over ranks, so every rank takes the same best/ decision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Distributed", "SINGLE", "init_from_env", "shutdown", "all_mean", "all_sum"]


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run; ``world_size == 1``: no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes checkpoints, logs and summaries."""
        return self.rank == 0


SINGLE = Distributed()


def init_from_env(device: str = "auto") -> Distributed:
    """Join the process group torchrun describes in the environment; :data:`SINGLE` outside torchrun.

    ``device`` is the run's ``train.device``: NCCL when it resolves to CUDA (each process then
    uses ``cuda:LOCAL_RANK``), gloo otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown(ctx: Distributed) -> None:
    """Leave the process group (a no-op for a single process)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(ctx: Distributed, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (the values themselves for one process)."""
    if not ctx.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_mean(ctx: Distributed, values: list[float], device: torch.device) -> list[float]:
    """Element-wise mean of ``values`` over the ranks."""
    return [v / ctx.world_size for v in all_sum(ctx, values, device)]
