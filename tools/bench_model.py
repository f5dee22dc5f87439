"""Model-only measurements for stica-bench: the training step of each cropping strategy of the
paper's Table 1f on synthetic tensors (no loader), timed after warm-up."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from stica.config import load_config
from stica.crops import crop_layout, sample_crops, windows
from stica.losses import Keys, Terms, cross_modal_pairs, stica_terms, step_key
from stica.model import Stica, feature_grid
from stica.train import compile_regions
from stica.tools.measure import DEFAULT_CONFIG, OpCounter, gpu_hours, summarize


@dataclass(frozen=True)
class Strategy:
    name: str
    large: int  # RGB views at full crop size
    small: tuple[int, int] = (0, 0)  # (count, size) of extra small RGB views (Multi-Crop)
    crops: dict | None = None  # feature crops; {"full": True} = the whole map as the one crop
    paper_gpu_hours: float | None = None  # Table 1f (V100, average pooling)


STICA = "Feature crops (2x6^2 + 4x4^2, 2x3 + 1x2)"  # the paper's strategy: the row every verdict reads


def table_1f(map_side: int = 7, map_time: int = 4) -> list[Strategy]:
    full = {"space_medium": [1, map_side], "space_small": [0, 1], "time_medium": [0, 1], "time_small": [0, 1]}
    sota = {"space_medium": [2, 6], "space_small": [4, 4], "time_medium": [2, 3], "time_small": [1, 2]}
    return [
        Strategy("Default (1x112^2)", 1, paper_gpu_hours=17.3),
        Strategy("Two RGB crops (2x112^2)", 2, crops=full, paper_gpu_hours=29.3),
        Strategy("Four RGB crops (4x112^2)", 4, paper_gpu_hours=60.0),
        Strategy("Multi RGB crops (2x112^2 + 1x96^2)", 2, (1, 96), paper_gpu_hours=46.7),
        Strategy("Multi RGB crops (2x112^2 + 2x96^2)", 2, (2, 96), paper_gpu_hours=53.3),
        Strategy("Multi RGB crops (2x112^2 + 6x96^2)", 2, (6, 96), paper_gpu_hours=100.7),
        Strategy("Feature crops (1x7^2, 1x4)", 2, crops=full, paper_gpu_hours=29.3),
        Strategy("Feature crops (2x6^2 + 4x4^2, 2x3 + 1x2)", 2, crops=sota, paper_gpu_hours=30.0),
    ]


def strategy_terms(cfg, strategy: Strategy, grid, device) -> Terms:
    """The loss each strategy trains with: L_va for the full-size views always; within-modal terms
    between the two views' feature crops, or between RGB views (Multi-Crop: every pair but
    small-small)."""
    if strategy.crops is not None:
        return stica_terms(cfg.loss, 2, crop_layout(OmegaConf.create(strategy.crops), grid), device)
    n = strategy.large + strategy.small[0]  # no feature crops: each view's whole map is its one window
    vv = [(step_key(i, 0, 1), step_key(j, 0, 1)) for i in range(n) for j in range(n)
          if i != j and (i < strategy.large or j < strategy.large)]
    groups = {"l_va": cross_modal_pairs(strategy.large, 1), **({"l_vv": vv} if vv else {})}
    return Terms(groups, {"l_va": cfg.loss.temp_va, "l_vv": cfg.loss.temp_vv}, {"l_va"}, device)


def strategy_loss(model, strategy: Strategy, views, spec, cfg, terms: Terms, rng):
    pooling = None
    if strategy.crops is not None:
        grid = feature_grid(*views[0].shape[2:])
        crops = [sample_crops(OmegaConf.create(strategy.crops), grid, rng) for _ in range(2)]
        pooling = tuple(t.to(views[0].device, non_blocking=True) for t in windows(crops, grid))
    losses = terms(Keys.of_step(model(views, spec, pooling)))
    return sum(cfg.loss[f"weight_{name.removeprefix('l_')}"] * value for name, value in losses.items())


def measure_step(cfg, strategy: Strategy, batch: int, frames: int, size: int, device, amp, repeats: int,
                 steps: int, warmup: int) -> dict:
    """Median step time (forward, backward, SGD) over `repeats` runs of `steps` steps, and the ops
    one step dispatches, by phase."""
    torch.manual_seed(0)
    model = Stica(cfg.model).to(device)
    cuda = device.type == "cuda"
    fmt = torch.channels_last_3d if cfg.train.channels_last else torch.contiguous_format  # as the trainer runs it
    model.video.to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, fused=cuda or None)
    sizes = [size] * strategy.large + [strategy.small[1] * size // 112] * strategy.small[0]
    views = [torch.randn(batch, 3, frames, s, s, device=device).contiguous(memory_format=fmt) for s in sizes]
    spec = torch.randn(batch, 1, cfg.data.audio.n_mels, round(frames / 30 * 100) - 1, device=device)
    rng = np.random.default_rng(0)
    terms = strategy_terms(cfg, strategy, feature_grid(frames, size, size), device)
    compile_regions(model, terms, cfg.train.compile, cfg.train.compile_mode)  # as the trainer runs it
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def step(counter=None):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = strategy_loss(model, strategy, views, spec, cfg, terms, rng)
        optimizer.zero_grad(set_to_none=True)
        if counter:
            counter.phase = "backward"
        loss.backward()
        if counter:
            counter.phase = "update"
        optimizer.step()

    for _ in range(warmup):
        step()
    counter, flops = OpCounter(), FlopCounterMode(display=False)
    if cfg.train.compile == "none":  # compiled regions launch generated kernels, which no dispatch mode sees
        with counter, flops:  # after the warm-up: lazy initialisation is not the step's
            step(counter)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t) / steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return {"step_s": summarize(times), "peak_mem_gib": peak, "ops": counter.counts or None,
            "gflops": flops.get_total_flops() / 1e9 if counter.counts else None}


def largest_batch(cfg, strategy: Strategy, frames: int, size: int, device, amp, limit: int = 1024) -> int:
    """Doubling, then bisection to within an eighth, on CUDA out-of-memory errors (GPU only): each
    try is a new shape to autotune, and the last few percent do not change a batch-size decision."""
    def fits(b):
        try:
            measure_step(cfg, strategy, b, frames, size, device, amp, repeats=1, steps=1, warmup=0)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    lo, hi = 0, 2  # the heads' BatchNorm needs two clips in training
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 8):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def run_model(p: dict, device, amp, dataset_size: int, largest_for: tuple[str, ...] | None = None) -> list[dict]:
    """Every strategy of Table 1f with average and transformer pooling (without and with the
    positional embedding); on a GPU also the largest
    batch that fits, for the strategies whose names start with one of `largest_for` (all if None)."""
    rows = []
    poolings = {"average": (0, False), "transformer (2 layers)": (2, False),
                "transformer (2 layers, positional)": (2, True)}
    for pooling, (layers, positional) in poolings.items():
        cfg = load_config(DEFAULT_CONFIG, [f"model.width={p['width']}", f"model.transformer.layers={layers}",
                                           f"model.transformer.positional={positional}"])
        _, h, _ = feature_grid(p["frames"], p["size"], p["size"])
        strategies = table_1f(map_side=h)
        base = None
        for s in strategies:
            m = measure_step(cfg, s, p["batch"], p["frames"], p["size"], device, amp, p["repeats"], p["steps"],
                             p["warmup"])
            step, fastest, slowest = m["step_s"]["median"], m["step_s"]["min"], m["step_s"]["max"]
            # The ratio to Default uses each row's fastest repeat: on a shared machine a busy spell
            # only ever adds time, and one slow repeat made a row read 11.5x Default.
            base = base or fastest
            rate = p["batch"] / step
            row = {"strategy": s.name, "pooling": pooling,
                   "batch": p["batch"], "step_s": step, "step_s_min": fastest, "step_s_max": slowest,
                   "spread": slowest / fastest, "clips_per_s": rate, "relative_to_default": fastest / base,
                   "gpu_hours_per_epoch": gpu_hours(dataset_size, rate), "peak_mem_gib": m["peak_mem_gib"],
                   "ops_forward": m["ops"]["forward"], "ops_backward": m["ops"]["backward"],
                   "ops_update": m["ops"]["update"], "ops": sum(m["ops"].values()), "gflops": m["gflops"],
                   "paper_gpu_hours_v100": s.paper_gpu_hours if layers == 0 else None,
                   "paper_relative": s.paper_gpu_hours / 17.3 if layers == 0 else None}
            # The embedding adds max_steps x 512 parameters: no batch search of its own.
            if device.type == "cuda" and not positional and (largest_for is None or s.name.startswith(largest_for)):
                row["max_batch"] = largest_batch(cfg, s, p["frames"], p["size"], device, amp)
            rows.append(row)
            print(f"[bench] model {row['pooling']:>34} | {s.name:<42} {step * 1000:8.1f} ms/step "
                  f"({row['relative_to_default']:.2f}x), {row['ops']:,} ops, {row['gflops']:.1f} GFLOP", flush=True)
            if row["spread"] > 1.5:
                print(f"[bench] warning: {s.name} ({row['pooling']}): repeats span {row['spread']:.1f}x "
                      f"({fastest * 1000:.1f}-{slowest * 1000:.1f} ms); the machine was busy. The ratio to Default "
                      f"uses the fastest repeat; rerun for a steadier median.", flush=True)
    return rows
