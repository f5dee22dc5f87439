"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

# DDP without a buffer broadcast at every forward: torch 2.13 renamed the argument (and warns at the
# old name); the GPU machines' 2.11 knows only the old one.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                  inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    local_world: int  # processes on this node
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(backend: str = "auto") -> Dist:
    """NCCL on GPUs, gloo on CPUs; a plain `python -m stica.train` runs as a world of one."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if (backend == "auto" and cuda) else ("gloo" if backend == "auto" else backend),
                                device_id=device if cuda else None)
    return Dist(rank, world, local_rank, local_world, device)


def amp_dtype(amp: str, device: torch.device):
    """The autocast dtype of train.amp (bf16 | fp16 | none); mixed precision is used on GPUs only."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if device.type == "cuda" else None


def any_rank(first_bad: torch.Tensor, stop: bool, device: torch.device, news: int = 0) -> tuple[int, bool, bool]:
    """One all-reduce and one host read: the first non-finite step seen on any rank (0 if none),
    whether any rank was asked to stop, and whether any has news to share (damaged samples it
    found). Every rank learns all three together, so all act together."""
    flags = torch.stack([torch.where(first_bad > 0, -first_bad, torch.iinfo(torch.long).min),
                         torch.tensor(int(stop), device=device), torch.tensor(news, device=device)]).to(device)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stopping, any_news = flags.tolist()
    return (-bad if bad != torch.iinfo(torch.long).min else 0), bool(stopping), bool(any_news)


def broadcast_object(obj):
    """Rank 0's object on every rank (a no-op for a world of one)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's object, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def teardown():
    """Every rank leaves together: a rank that tears its process group down while another is still
    writing a checkpoint or a plot has been seen to abort (gloo, 'terminate called without an
    active exception') and fail the whole torchrun job."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
