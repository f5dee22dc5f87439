"""Redraws docs/figures/loaders-h100.png, the README's headline plot, from the committed results
of the H100 session (benchmarks/gpu-2026-11-26/run-96afa52): clips/s of each loader by CPU
threads, on one H100 machine's 16 vCPUs.

    python docs/figures.py
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "gpu-2026-11-26" / "run-96afa52"


def loader_rows() -> dict[str, dict[int, float]]:
    """{loader: {threads: clips/s}} from the session's JSON rows."""
    rows = {"DALI hybrid (CPU decode, GPU augment)": {}, "DALI CPU": {}, "reference (PyAV + torch)": {}}
    for r in json.loads((RUN / "hybrid_rows.json").read_text()):
        rows["DALI hybrid (CPU decode, GPU augment)"][r["parallel"]] = r["clips_per_s"]["median"]
    for r in json.loads((RUN / "cpu16_rows.json").read_text()):
        name = "DALI CPU" if r["backend"] == "dali" else "reference (PyAV + torch)"
        rows[name][r["threads_or_workers"]] = r["clips_per_s"]
    return rows


def main(out: Path = ROOT / "docs" / "figures" / "loaders-h100.png") -> Path:
    rows = loader_rows()
    threads = sorted({t for r in rows.values() for t in r})
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    width = 0.8 / len(rows)
    for k, (name, rates) in enumerate(rows.items()):
        xs = [i + (k - 1) * width for i in range(len(threads))]
        bars = ax.bar(xs, [rates.get(t, 0) for t in threads], width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.axhline(150, color="k", ls="--", lw=1, label="target: 150 clips/s per GPU")
    ax.set_xticks(range(len(threads)), [f"{t} threads" for t in threads])
    ax.set_ylabel("clips/s (two views + spectrogram)")
    ax.set_title("Loaders on one H100 machine, 16 vCPUs (2026-11-26, 96afa52)", fontsize=10)
    ax.set_ylim(0, 1.4 * max(max(r.values()) for r in rows.values()))  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(main())
