"""What every stica-bench mode shares: summaries of repeated measurements, the device's name,
GPU-hours per epoch, CSV tables, and the count of the operations a step dispatches."""
from __future__ import annotations

import csv
import platform
import statistics
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "pretrain_kinetics.yaml")
KINETICS_TRAIN = 234_643  # the paper's copy (Non-local/PySlowFast: 234,643 train videos)


def summarize(samples: list[float]) -> dict:
    """Median and spread (min, max) of repeated measurements."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def gpu_hours(dataset_size: int, clips_per_s_per_device: float) -> float:
    return dataset_size / clips_per_s_per_device / 3600


def write_csv(rows: list[dict], path: Path):
    if rows:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def loader_table(rows: list[dict]) -> list[str]:
    """Markdown lines of a loader throughput table (stica-bench and its --gpu-check); a content
    column where the rows name their content set."""
    content = any("content" in r for r in rows)

    def line(r):
        first = f"| {r.get('content', '-')} " if content else ""
        if r["clips_per_s"] is None:
            return f"{first}| {r['backend']} | {r['note']} | | | | |"
        return (f"{first}| {r['backend']} | {r['decode']} | {r['threads_or_workers']} | {r.get('prefetch', '-')} | "
                f"{r['clips_per_s']:.1f} ({r['clips_per_s_min']:.1f}-{r['clips_per_s_max']:.1f}) | "
                f"{r['clips_per_s_per_core']:.1f} |")
    head = "| content " if content else ""
    return [f"{head}| backend | decode | threads/workers | prefetch | clips/s (min-max) | per core |",
            "|---" * (6 + content) + "|"] + [line(r) for r in rows]


def loader_winners(rows: list[dict], cores: int) -> list[str]:
    """Per content set: each CPU loader's clips/s per core with the whole machine busy (its most
    threads or workers up to the cores; fewer read high, as the main process works on a core of
    its own), the winner, and DALI against the best peer (the target: at least 1.1x)."""
    lines = []
    for content in dict.fromkeys(r.get("content", "-") for r in rows):
        cpu = [r for r in rows if r.get("content", "-") == content and r["clips_per_s"] is not None
               and r["decode"] == "cpu" and r["threads_or_workers"] <= cores]
        full = {b: max((r for r in cpu if r["backend"] == b), key=lambda r: (r["threads_or_workers"], r["clips_per_s"]))
                for b in dict.fromkeys(r["backend"] for r in cpu)}
        if not full:
            continue
        rates = {b: r["clips_per_s_per_core"] for b, r in full.items()}
        winner = max(rates, key=rates.get)
        text = ", ".join(f"{b} {v:.1f} (x{full[b]['threads_or_workers']})" for b, v in rates.items())
        peers = {b: v for b, v in rates.items() if b != "dali"}
        versus = ""
        if "dali" in rates and peers:
            best = max(peers, key=peers.get)
            versus = f"; DALI / {best} = {rates['dali'] / peers[best]:.2f}x (target: at least 1.10x)"
        lines.append(f"- {content}: clips/s per core with all {cores} cores busy: {text}. Winner per core: "
                     f"**{winner}**{versus}.")
    return lines


# Ops whose result the host must read before it can go on: a value (.item(), bool(), a copy to the
# host) or a shape that depends on the data (nonzero, boolean indexing). On a GPU each is a host sync.
DATA_DEPENDENT = {"nonzero", "masked_select", "_local_scalar_dense", "unique", "_unique", "_unique2", "unique_dim",
                  "unique_consecutive", "equal", "is_nonzero", "repeat_interleave"}
INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, by `phase` (forward, backward, update; set it
    between the parts). On a GPU an eager op is about one kernel launch, 8-11 us each on an H100
    whatever its size, so the count says what a step costs beyond its arithmetic without a GPU
    and without drifting with the machine's load. Also lists the data-dependent ops it saw."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.counts: dict[str, int] = {}
        self.data_dependent: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.phase] = self.counts.get(self.phase, 0) + 1
        name = func.overloadpacket.__name__
        kwargs = kwargs or {}
        bool_index = name in INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                              for i in (args[1] or ()) if i is not None)
        to_host = (name == "_to_copy" and args[0].device.type != "cpu" and str(kwargs.get("device")) == "cpu") or \
                  (name == "copy_" and args[0].device.type == "cpu" and args[1].device.type != "cpu")
        if (name in DATA_DEPENDENT and not (name == "repeat_interleave" and kwargs.get("output_size"))) \
                or bool_index or to_host:
            self.data_dependent.append(f"{self.phase}: {func}")
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
