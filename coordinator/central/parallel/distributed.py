"""Process-group setup from the ``torchrun`` environment and world-size-agnostic helpers.

``init_distributed()`` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` /
``MASTER_PORT`` (set by ``torchrun``); without them it creates a one-process group on a
free local port, so the same code path (FSDP2 mesh, expert parallelism, DCP) runs with
one rank too. Backend: nccl with one CUDA device per local rank when CUDA is available,
otherwise gloo on CPU.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """The distributed environment is unusable (bad env variables, sizes that do not divide)."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that writes summaries and logs)."""
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``--master-port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise DistributedError(f"environment variable {name}={raw!r} must be an integer") from exc


def init_distributed(device: str | None = None) -> DistEnv:
    """Initialise (or reuse) the default process group.

    Args:
        device: ``"cpu"`` or ``"cuda"``; default CUDA when available.

    Returns:
        :class:`DistEnv` of this process.

    Raises:
        DistributedError: inconsistent environment (e.g. RANK >= WORLD_SIZE).
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise DistributedError("device 'cuda' requested but CUDA is not available")
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} must be in 0 .. WORLD_SIZE-1 = {world - 1}")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # plain `python ...`: a group of one
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group(backend, rank=rank, world_size=world)
    else:
        backend = dist.get_backend()
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world, local_rank, dev, backend)


def shutdown_distributed() -> None:
    """Destroy the default process group if one exists.

    Ranks meet at a barrier first: a rank tearing its gloo group down while a peer still
    has collectives in flight aborted the peer ("terminate called without an active
    exception") in a full test run.
    """
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    """World size of the default group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """Rank in the default group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def all_reduce_sum(t: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """Sum ``t`` over ranks (a new tensor; identity on one process).

    Args:
        t: tensor of the same shape on every rank.
        differentiable: use the autograd-aware collective (its backward sums the
            gradients of all ranks into every rank).
    """
    if world_size() == 1:
        return t
    if differentiable:
        import torch.distributed.nn.functional as dnn

        return dnn.all_reduce(t, op=dist.ReduceOp.SUM)
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    """Barrier on the default group (no-op without one)."""
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()
