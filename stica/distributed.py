"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

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


def setup(backend: str = "auto", timeout_s: float | None = None, trace_dir: Path | None = None) -> Dist:
    """NCCL on GPUs, gloo on CPUs; a plain `python -m stica.train` runs as a world of one.
    `timeout_s` bounds every collective (and the rendezvous's store) until `set_timeout` changes
    it; `trace_dir` receives NCCL's flight-recorder dumps."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        name = "nccl" if (backend == "auto" and cuda) else ("gloo" if backend == "auto" else backend)
        if name == "nccl":
            nccl_error_handling(trace_dir)
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        store, rank, world = next(dist.rendezvous("env://", **({"timeout": timeout} if timeout else {})))
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's shared store outlives a restart of the group: in it the restarted ranks
            # found the last attempt's gloo addresses (dead processes) and failed with "Connection
            # refused" in 3 of 6 restarts here. Each attempt keys its own. A node that joins
            # afresh counts attempts from 0, so for replaced nodes torchrun must not share its
            # store: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/nodes.md).
            store = dist.PrefixStore(f"stica/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/", store)
            if rank == 0 and world != local_world:
                print("[stica.train] warning: torchrun shares its store across nodes; a replaced node will hang "
                      "the rendezvous. Launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.", file=sys.stderr, flush=True)
        dist.init_process_group(name, store=store, rank=rank, world_size=world, device_id=device if cuda else None,
                                timeout=timeout)
    return Dist(rank, world, local_rank, local_world, device)


def nccl_error_handling(trace_dir: Path | None):
    """A timed-out NCCL collective aborts its communicator and ends the process (mode 1), so torchrun
    sees a failed worker and restarts the group from the checkpoint; without it the watchdog may
    leave the process alive and stuck. The flight recorder keeps each rank's last collectives and
    dumps them on a timeout: `python -m torch.distributed.flight_recorder.fr_trace DIR` then names
    the rank that never joined. What the user set in the environment wins."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    for name in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"):  # torch 2.13's name, and the older one
        os.environ.setdefault(name, "2000")
    if trace_dir is not None:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        for name in ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"):
            os.environ.setdefault(name, str(Path(trace_dir) / "rank_"))


def set_timeout(seconds: float):
    """Every process group's collective timeout from now on (the BN subgroups too): long for
    start-up, short once steps are steady (comm.init_timeout_s, comm.train_timeout_s)."""
    if not dist.is_initialized():
        return
    c10d = dist.distributed_c10d
    for group in [g for g in c10d._world.pg_map if not c10d._rank_not_in_group(g)]:
        c10d._set_pg_timeout(timedelta(seconds=seconds), group)


def amp_dtype(amp: str, device: torch.device, cpu_bf16: bool = False):
    """The autocast dtype: on GPUs, train.amp's (bf16 | fp16 | none); on the CPU, bf16 where
    train.cpu_bf16 asks for it and the CPU computes in bf16 natively, else none."""
    if device.type == "cuda":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.bfloat16 if cpu_bf16 and cpu_has_bf16() else None


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: there oneDNN's bf16 convolutions halved the demo trunk's step (1.55 ->
    0.78 s, 2026-12-07); elsewhere oneDNN emulates bf16 and it would cost time instead."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))


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
