"""Feature crops (paper Sec. 3.2): sub-tubes of the trunk's output map, cropped in space (all time
steps) or in time (the whole spatial grid), drawn once per step for the whole batch.

The model does not slice the map once per crop. `windows` turns every view's crops into one
pooling matrix, so all the crops of a step are averaged over space in one matmul whatever their
number. The positions reach the device as the values of a tensor, not as Python ints, so a
compiled region or a CUDA graph replays with new positions instead of being rebuilt."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass(frozen=True)
class Crop:
    axis: str  # "space" or "time"
    size: int
    small: bool
    start: tuple[int, ...] = ()  # (y, x) for space, (t,) for time; () in a layout


def crop_layout(cfg, grid: tuple[int, int, int]) -> list[Crop]:
    """The crops a step draws, in order, without positions: cfg.{space,time}_{medium,small} =
    [count, size]. The layout is the same every step; only the positions change."""
    T, H, W = grid
    layout = []
    for axis, extents in (("space", (H, W)), ("time", (T,))):
        for kind in ("medium", "small"):
            count, size = cfg[f"{axis}_{kind}"]
            if count and any(size > e for e in extents):
                raise ValueError(f"a {axis} crop of {size} does not fit a feature map of {extents}")
            layout += [Crop(axis, size, kind == "small")] * count
    return layout


def sample_crops(cfg, grid: tuple[int, int, int], rng: np.random.Generator) -> list[Crop]:
    """The layout with positions. Every valid start is equally likely: 0..(extent - size) inclusive.
    (The released code draws from 0..extent-size-1, so its 6x6 crop of a 7x7 map is always the
    top-left one and the last row and column are never used.) A numpy generator, not torch's:
    drawing a Python int from a torch tensor is an `.item()` inside the step."""
    T, H, W = grid
    return [replace(c, start=tuple(int(rng.integers(0, e - c.size + 1)) for e in ((H, W) if c.axis == "space" else (T,))))
            for c in crop_layout(cfg, grid)]


def windows(crops: list[list[Crop]], grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooling weights for V views' maps (T,H,W each): window 0 of a view is its whole map, window
    1 + i its crop i. Returns weights V,S,T,T*H*W, where row k of a window averages over space
    the window's k-th time step, and valid S,T, False at the rows past a window's time steps (a
    time crop is shorter than the map; its missing steps are padding, masked in the pooling).
    Every view must have the same layout (sample_crops draws one)."""
    T, H, W = grid
    S = 1 + len(crops[0])
    weights = np.zeros((len(crops), S, T, T, H, W), np.float32)  # view, window, row, t, y, x
    valid = np.zeros((S, T), bool)
    for v, view_crops in enumerate(crops):
        weights[v, 0, np.arange(T), np.arange(T)] = 1 / (H * W)
        for s, c in enumerate(view_crops, 1):
            if c.axis == "space":
                (y, x), n = c.start, c.size
                weights[v, s, np.arange(T), np.arange(T), y:y + n, x:x + n] = 1 / (n * n)
            else:
                steps = np.arange(c.size)
                weights[v, s, steps, c.start[0] + steps] = 1 / (H * W)
    valid[0] = True
    for s, c in enumerate(crops[0], 1):
        valid[s, : T if c.axis == "space" else c.size] = True
    return torch.from_numpy(weights.reshape(len(crops), S, T, T * H * W)), torch.from_numpy(valid)
