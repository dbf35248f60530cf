"""Data-parallel finetune under ``torchrun``: one process per device, DistributedDataParallel over the trained
parameters (the frozen backbone has no gradients, so DDP leaves it alone), gloo on the CPU, nccl on CUDA.

``--batch-size`` stays the global batch: every process takes its contiguous share of each global batch in the
run's seeded order, and DDP averages the gradients, so with equal shares and per-image loss means a step is
the single-process step of the same global batch. Only rank 0 writes checkpoints, the model and the report.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, List, Sequence

import torch

from ..errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class World:
    """This process's place in the run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    started_here: bool = False  # this module created the process group (and ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, chunk: Sequence[int]) -> List[int]:
        """This process's contiguous share of one global batch (shares differ by at most one image)."""
        n, k = len(chunk), self.size
        start = self.rank * (n // k) + min(self.rank, n % k)
        return list(chunk[start:start + n // k + (1 if self.rank < n % k else 0)])

    def mean(self, values: List[float], device: torch.device) -> List[float]:
        """The mean of per-process values over the run (losses for the log and the report)."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return (t / self.size).tolist()

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.started_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def join(device: torch.device) -> World:
    """Join the ``torchrun`` process group when its environment is set (``WORLD_SIZE`` > 1)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not torch.distributed.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    started = False
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
        started = True
    world = World(torch.distributed.get_rank(), torch.distributed.get_world_size(), started)
    logger.info("distributed finetune: rank %d of %d (%s)", world.rank, world.size,
                torch.distributed.get_backend())
    return world


def local_device(device: torch.device) -> torch.device:
    """Under torchrun on CUDA, each process takes the GPU of its ``LOCAL_RANK``."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        index = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return device


def wrap(model: torch.nn.Module, world: World) -> Any:
    """The module the training step calls: DDP over the trained parameters when distributed."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(p for p in model.parameters() if p.requires_grad).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)
