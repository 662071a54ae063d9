"""Process-group set-up for `python -m training.<task>` and `torchrun`.

Design decisions (as open_clip's training/distributed.py does it):
- Rank and world size come from the environment: torchrun sets RANK,
  WORLD_SIZE and LOCAL_RANK; SLURM sets SLURM_PROCID / SLURM_NTASKS /
  SLURM_LOCALID. With neither, one process and no process group.
- gloo on CPU, nccl on CUDA (gloo is the only CPU backend that supports
  every collective the trainer needs, including all_gather with autograd).
- On CPU, torch threads are split between local ranks so two processes on a
  2-core machine do not oversubscribe it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine import settings


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun or SLURM variables; (0, 0, 1) otherwise."""
    if "WORLD_SIZE" in os.environ:
        return _env_int("RANK", default=0), _env_int("LOCAL_RANK", default=0), _env_int("WORLD_SIZE", default=1)
    if "SLURM_NTASKS" in os.environ and _env_int("SLURM_NTASKS", default=1) > 1:
        return _env_int("SLURM_PROCID", default=0), _env_int("SLURM_LOCALID", default=0), _env_int("SLURM_NTASKS", default=1)
    return 0, 0, 1


def init_distributed(device: str = "auto") -> DistEnv:
    rank, local_rank, world = world_from_env()
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # SLURM without torchrun: single node default
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    if not use_cuda:
        local_world = _env_int("LOCAL_WORLD_SIZE", default=world)
        threads = max(1, (os.cpu_count() or 1) // max(1, local_world))
        torch.set_num_threads(settings.THREADS.get() or threads)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def all_gather_with_grad(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Concatenate `x` over ranks in rank order, keeping autograd (backward sums the gradients)."""
    if not env.distributed:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def all_reduce_mean(value: float, env: DistEnv) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item() / env.world_size)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
