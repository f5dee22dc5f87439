"""Atomic checkpoints in a run directory and the automatic resume from the newest one."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

LATEST = "checkpoint.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, state: dict, keep_as: str | None = None):
    """Write to a temporary file, fsync, then rename: a kill mid-write leaves the previous
    checkpoint intact. `keep_as` also keeps a copy under that name (e.g. per epoch)."""
    tmp = run_dir / (LATEST + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / LATEST)
    if keep_as:
        os.link(run_dir / LATEST, run_dir / (keep_as + ".tmp"))
        os.replace(run_dir / (keep_as + ".tmp"), run_dir / keep_as)


def load_latest(run_dir: Path, device) -> dict | None:
    path = run_dir / LATEST
    if not path.exists():
        return None
    return torch.load(path, map_location=device, weights_only=False)


def rescale_position(state: dict, world: int) -> dict:
    """The loader position of a checkpoint written by another number of processes. Each rank
    reads a contiguous share of the epoch, so a world-size change can only take effect where no
    share has been started: at an epoch boundary. Mid-epoch it would repeat or skip samples, so
    it is refused with what to do instead."""
    position = state["loader"]
    if position["batch"] != 0:
        raise SystemExit(
            f"this checkpoint (step {state['step']}) was written by {state['world']} processes in the middle of "
            f"epoch {position['epoch']} (batch {position['batch']}); resuming it with {world} would repeat or skip "
            f"samples. Resume with {state['world']} processes until the epoch ends (every epoch end writes "
            f"{LATEST}), then change the world size.")
    return position
