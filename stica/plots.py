"""Pictures of what people would rather see than read."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def draw_loss(ax, log_path: str | Path, title: str = "STiCA pretraining"):
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    steps = [r["step"] for r in records]
    for key, label in (("loss", "total"), ("l_va", "L_va (cross-modal)"), ("l_vv", "L_vv (feature crops)")):
        if key in records[0]:
            ax.plot(steps, [r[key] for r in records], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)


def plot_loss(log_path: str | Path, png_path: str | Path, title: str = "STiCA pretraining"):
    fig, ax = plt.subplots(figsize=(7, 4))
    draw_loss(ax, log_path, title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
