"""Training on several processes with torch.distributed: the process group and the collectives.

A run is distributed when a `torch.distributed` process group is initialised, by the caller or,
for a process that `torchrun` launched, by `process_group()` (gloo on CPU, NCCL on CUDA). The
trainer then uses `Replicas`: gradients averaged with one all-reduce per dictionary and step, the
statistics that decisions are taken from (latent fire counts, activation norms) summed over ranks,
state that must agree broadcast from rank 0, and whatever is written written by rank 0 alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from sae_circuits.errors import UserInputError

# set by torchrun (and torch.distributed.launch) for every process it starts
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process was started by torchrun (its rendezvous variables are set)."""
    return all(name in os.environ for name in _LAUNCH_VARIABLES)


def local_device(device: str | torch.device) -> torch.device:
    """`device`, made this process's own GPU (`cuda:LOCAL_RANK`) for a plain `cuda` under torchrun."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextmanager
def process_group(device: str | torch.device = "cpu") -> Iterator[None]:
    """For a process torchrun launched and no group yet: a process group for the block (NCCL for
    a CUDA `device`, else gloo), destroyed after it. Otherwise nothing is done."""
    if not dist.is_available() or dist.is_initialized() or not launched():
        yield
        return
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
        dist.barrier()  # no rank leaves (and tears the group down) while another still works
    finally:
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """Whether this process writes outputs: rank 0, or the only process."""
    return rank_and_world()[0] == 0


def share(total: int, what: str) -> int:
    """This rank's equal share of `total` (a global batch), or a UserInputError if it does not split."""
    _, world = rank_and_world()
    if total % world:
        raise UserInputError(f"{what} {total} does not split over {world} processes")
    return total // world


class Replicas:
    """The processes of the initialised process group, as the trainer needs them."""

    def __init__(self) -> None:
        self.rank, self.world = rank_and_world()

    @classmethod
    def current(cls) -> Replicas | None:
        """The group this process trains in; None when it trains alone."""
        return cls() if rank_and_world()[1] > 1 else None

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks (one all-reduce of all of them)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(part.view_as(grad))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks, in place."""
        dist.all_reduce(tensor)
        return tensor

    def average(self, tensors: Iterable[torch.Tensor]) -> None:
        """Each tensor replaced in place by its mean over the ranks."""
        for tensor in tensors:
            dist.all_reduce(tensor)
            tensor /= self.world

    def all(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` holds on every rank."""
        value = torch.tensor([int(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' `x` (same shape on each) stacked in rank order: the global batch."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def gather_rows_to(self, x: torch.Tensor, destination: int) -> torch.Tensor | None:
        """The global batch of `x` on rank `destination` (None on the others)."""
        parts = (
            [torch.empty_like(x) for _ in range(self.world)] if self.rank == destination else None
        )
        dist.gather(x.contiguous(), parts, dst=destination)
        return torch.cat(parts) if parts is not None else None

    def broadcast(self, tensors: Iterable[torch.Tensor]) -> None:
        """Rank 0's values copied into each rank's tensors, in place."""
        for tensor in tensors:
            dist.broadcast(tensor, src=0)

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's picklable `obj` on rank 0, in rank order (None on the others)."""
        objects = [None] * self.world if self.writer else None
        dist.gather_object(obj, objects, dst=0)
        return objects

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj` on every rank, in rank order."""
        objects: list[Any] = [None] * self.world
        dist.all_gather_object(objects, obj)
        return objects


def module_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors a replica of `module` in training must share: parameters, buffers, and the
    optimizer's state tensors."""
    tensors = [t.data for t in (*module.parameters(), *module.buffers())]
    for state in optimizer.state.values():
        tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return tensors


def balanced_owners(costs: list[float], world: int) -> list[int]:
    """A rank for each item so that the ranks' summed costs are close (largest first, each to
    the least loaded rank; ties to the lower rank, so rank 0 owns the largest)."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
        rank = min(range(world), key=lambda r: load[r])
        owners[index] = rank
        load[rank] += costs[index]
    return owners


__all__ = [
    "Replicas",
    "balanced_owners",
    "is_writer",
    "launched",
    "local_device",
    "process_group",
    "rank_and_world",
    "share",
]
