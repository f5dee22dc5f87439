"""Feature crops (paper Sec. 3.2): sub-tubes of the trunk's output map, cropped in space (all time
steps) or in time (the whole spatial grid), drawn once per step for the whole batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Crop:
    axis: str  # "space" or "time"
    size: int
    start: tuple[int, ...]  # (y, x) for space, (t,) for time
    small: bool

    def apply(self, fmap: torch.Tensor) -> torch.Tensor:
        """fmap: B,D,T,H,W."""
        if self.axis == "space":
            y, x = self.start
            return fmap[:, :, :, y:y + self.size, x:x + self.size]
        (t,) = self.start
        return fmap[:, :, t:t + self.size]


def sample_crops(cfg, grid: tuple[int, int, int], generator: torch.Generator) -> list[Crop]:
    """cfg.{space,time}_{medium,small} = [count, size]. Every valid start is equally likely:
    0..(extent - size) inclusive. (The released code draws from 0..extent-size-1, so its 6x6
    crop of a 7x7 map is always the top-left one and the last row and column are never used.)"""
    T, H, W = grid
    crops = []
    for axis, extents in (("space", (H, W)), ("time", (T,))):
        for kind in ("medium", "small"):
            count, size = cfg[f"{axis}_{kind}"]
            if count and any(size > e for e in extents):
                raise ValueError(f"a {axis} crop of {size} does not fit a feature map of {extents}")
            for _ in range(count):
                start = tuple(int(torch.randint(0, e - size + 1, (), generator=generator)) for e in extents)
                crops.append(Crop(axis, size, start, kind == "small"))
    return crops
