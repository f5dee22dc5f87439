"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(backend: str = "auto") -> Dist:
    """NCCL on GPUs, gloo on CPUs; a plain `python -m stica.train` runs as a world of one."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if (backend == "auto" and cuda) else ("gloo" if backend == "auto" else backend),
                                device_id=device if cuda else None)
    return Dist(rank, world, local_rank, device)


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every rank (one rank's bad loss must stop all of them together)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)
    return t.item() == 0


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()
