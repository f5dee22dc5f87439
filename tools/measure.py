"""What every stica-bench mode shares: summaries of repeated measurements, the device's name,
GPU-hours per epoch and CSV tables."""
from __future__ import annotations

import csv
import platform
import statistics
from pathlib import Path

import torch

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
    """Markdown lines of a loader throughput table (stica-bench and its --gpu-check)."""
    def line(r):
        if r["clips_per_s"] is None:
            return f"| {r['backend']} | {r['note']} | | | | |"
        return (f"| {r['backend']} | {r['decode']} | {r['threads_or_workers']} | {r.get('prefetch', '-')} | "
                f"{r['clips_per_s']:.1f} ({r['clips_per_s_min']:.1f}-{r['clips_per_s_max']:.1f}) | "
                f"{r['clips_per_s_per_core']:.1f} |")
    return ["| backend | decode | threads/workers | prefetch | clips/s (min-max) | per core |",
            "|---|---|---|---|---|---|"] + [line(r) for r in rows]
