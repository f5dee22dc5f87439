"""stica-bench: measured throughput and GPU-hours per epoch, loader and model apart and together.

    stica-bench --shards DIR --quick                  # 2-core CPU, a few minutes
    stica-bench --shards DIR                          # full preset (meant for a GPU)
    stica-bench --gpu-check --out benchmarks/gpu      # the GPU path proven by one command, on one GPU

Writes report.md (also printed), results.json, one CSV per table and bench.png to --out.
Clip starts beyond a video's last clip are clamped, so the clipcost table needs 10-s videos.
GPU-hours per epoch = world x epoch seconds / 3600 = dataset size / (clips/s per device) / 3600.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from stica.config import HelpFormatter
from stica.distributed import amp_dtype
from stica.shards import load_manifest
from stica.tools import gpu_check
from stica.tools.bench_model import run_model
from stica.tools.bench_train import run_end_to_end
from stica.tools.measure import KINETICS_TRAIN, device_name, loader_table, loader_winners, write_csv

PRESETS = {
    # quick: an eighth of the channels, so the 8 strategies x 3 poolings run in minutes on 2 cores;
    # the relative costs are the point there, not the absolute figures.
    "quick": dict(width=0.125, batch=2, frames=30, size=112, repeats=3, steps=1, warmup=1, parallel=[1, 2],
                  prefetch=[2], loader_batches=4, loader_batch=4, loader_epochs=2, e2e_steps=6),
    "full": dict(width=1.0, batch=8, frames=30, size=112, repeats=5, steps=5, warmup=3, parallel=[2, 4, 8, 16],
                 prefetch=[1, 2, 3], loader_batches=20, loader_batch=8, loader_epochs=3, e2e_steps=60),
}


def markdown(results: dict) -> str:
    out = [f"# stica-bench ({results['preset']}) on {results['device']}", "",
           f"Dataset size {results['dataset_size']:,} videos; GPU-hours per epoch = size / (clips/s per device) / 3600."
           f" Paper figures: V100, batch 8, their code (Table 1f).", ""]
    if results.get("model"):
        out += ["## Model only (synthetic tensors)", "",
                "Ops: the aten operations one step dispatches (forward + backward + SGD update), about one kernel "
                "launch each on a GPU. GFLOP: the arithmetic of that step (torch.utils.flop_counter), which does not "
                "drift with the machine.", "",
                "| pooling | strategy | ms/step (min-max) | clips/s | vs Default | GPU-h/epoch | paper GPU-h (V100) | paper vs Default | peak GiB | max batch | ops (fwd + bwd + update) | GFLOP |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["model"]:
            f = lambda v, fmt: "-" if v is None else format(v, fmt)
            out.append(f"| {r['pooling']} | {r['strategy']} | {r['step_s'] * 1000:.1f} ({r['step_s_min'] * 1000:.1f}-"
                       f"{r['step_s_max'] * 1000:.1f}) | {r['clips_per_s']:.2f} | {r['relative_to_default']:.2f}x | "
                       f"{r['gpu_hours_per_epoch']:.1f} | {f(r['paper_gpu_hours_v100'], '.1f')} | "
                       f"{f(r['paper_relative'], '.2f')} | {f(r['peak_mem_gib'], '.2f')} | {r.get('max_batch', '-')} | "
                       f"{r['ops']:,} ({r['ops_forward']:,} + {r['ops_backward']:,} + {r['ops_update']:,}) | "
                       f"{f(r['gflops'], '.2f')} |")
        out.append("")
    if results.get("loader"):
        out += ["## Loader only (two views + spectrogram per clip, whole epochs)", "", *loader_table(results["loader"]), ""]
        out += [*loader_winners(results["loader"], results["cpu_cores"]), ""]
    if results.get("clip_cost"):
        rows = results["clip_cost"]
        out += ["## Decode cost by clip start (DALI CPU decoder, 1 thread, 30 frames)", "",
                "| start frame | ms per clip (min-max) | vs start 0 |", "|---|---|---|"]
        out += [f"| {r['start']} | {r['ms_per_clip']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | "
                f"{r['ms_per_clip'] / rows[0]['ms_per_clip']:.2f}x |" for r in rows]
        out.append("")
    if results.get("cpu_side"):
        out += ["## CPU time per clip, part by part (the hybrid loader's CPU side, and the CPU loader)", "",
                "The process's CPU time (every thread) per clip over steady batches, the fastest repeat; each part "
                "row adds one part to the row above.", "", "| content | part | CPU ms per clip (fastest, slowest) | this part |", "|---|---|---|---|"]
        for r in results["cpu_side"]:
            if r["cpu_ms_per_clip"] is None:
                out.append(f"| {r['content']} | {r['stage']} | {r['note']} | |")
                continue
            part = "" if r["stage_ms"] is None else f"{r['stage_ms']:+.1f}"
            out.append(f"| {r['content']} | {r['stage']} | {r['cpu_ms_per_clip']:.1f} ({r['ms_max']:.1f}) | {part} |")
        out.append("")
    if results.get("profile"):
        b = results["epoch_boundary"]
        out += ["## Where a clip's time goes (DALI CPU graph, one thread)", "",
                "Each row turns one more stage on; its cost is the difference from the row above.", "",
                "| stage | ms per clip per core (min-max) | this stage |", "|---|---|---|"]
        out += [f"| {r['stage']} | {r['ms_per_clip']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | "
                f"{r['stage_ms']:+.1f} |" for r in results["profile"]]
        out += ["", f"Epoch boundary: the first batch of an epoch waits {b['boundary_s'] * 1000:.0f} ms (at most "
                f"{b['boundary_s_max'] * 1000:.0f}) beyond a steady batch of {b['steady_batch_s'] * 1000:.0f} ms "
                f"({b['batches_per_epoch']} batches per epoch, {b['epochs']} epochs).", ""]
    if results.get("end_to_end"):
        e = results["end_to_end"]
        out += ["## End to end (the trainer on the shards)", "",
                f"{e['clips_per_s']:.2f} clips/s with the {e['loader']} loader, data wait {e['data_wait_pct']:.0f}% "
                f"(median of {e['steps_timed']} steps): bound by the {e['bound_by']}.", ""]
    return "\n".join(out)


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2, 1]})
    rows = [r for r in results.get("model", []) if r["pooling"] == "average"]
    if rows:
        names = [r["strategy"].replace(" (", "\n(") for r in rows]
        x = range(len(rows))
        axes[0].bar([i - 0.2 for i in x], [r["relative_to_default"] for r in rows], 0.4, label="measured")
        axes[0].bar([i + 0.2 for i in x], [r["paper_relative"] for r in rows], 0.4, label="paper (V100)")
        axes[0].set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
        axes[0].set_ylabel("step cost relative to Default")
        axes[0].set_title(f"Cropping strategies ({results['device']})")
        axes[0].legend()
    bars = [(f"{r['backend']} x{r['threads_or_workers']}" + (f" pf{r['prefetch']}" if r.get("prefetch", "-") != "-" else ""),
             r["clips_per_s"]) for r in results.get("loader", []) if r["clips_per_s"] is not None]
    model_rate = next((r["clips_per_s"] for r in results.get("model", [])
                       if r["strategy"].startswith("Feature crops (2x6") and r["pooling"] != "average"), None)
    if model_rate:
        bars.append(("model (STiCA step)", model_rate))
    if bars:
        axes[1].barh([b[0] for b in bars], [b[1] for b in bars], color=["C0"] * (len(bars) - bool(model_rate)) + ["C3"] * bool(model_rate))
        axes[1].set_xlabel("clips/s")
        axes[1].set_title("Loader vs model throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_profile(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["profile"]
    fig, ax = plt.subplots(figsize=(8, 4))
    left = 0.0
    for i, r in enumerate(rows):
        width = max(r["stage_ms"], 0.0)  # a stage within the noise can read slightly negative
        ax.barh(0, width, left=left, color=f"C{i}", label=f"{r['stage']} ({r['stage_ms']:+.1f})")
        left += width
    ax.set_yticks([])
    ax.set_xlabel("ms per clip per core (DALI CPU graph, one thread)")
    ax.set_title(f"Where a clip's time goes ({results['device']})")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_soak(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(r["loader"] for r in rows):
        ax.plot([r["epoch"] for r in rows if r["loader"] == name], [r["rss_mib"] for r in rows if r["loader"] == name],
                label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title("Loader memory across epochs")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stica-bench", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--shards", help="stica-shard output (needed for the loader and end-to-end modes)")
    parser.add_argument("--quick", action="store_true", help="the CPU preset: minutes on 2 cores")
    parser.add_argument("--modes", default="model,loader,clipcost,e2e",
                        help="comma list of model, loader, clipcost (decode cost by clip start), e2e, soak "
                             "(resident memory over --soak-epochs epochs of each loader), profile (the cost of "
                             "each stage of the DALI CPU graph, of an epoch boundary, and the CPU time per clip of "
                             "each part of the hybrid and CPU loaders)")
    parser.add_argument("--footage-shards", metavar="DIR",
                        help="a second content set for the loader and profile modes: camera footage packed by "
                             "stica-shard (python -m stica.tools.footage makes it); the tables report both")
    parser.add_argument("--soak-epochs", type=int, default=100, help="epochs of each loader in the soak mode")
    parser.add_argument("--out", default="runs/bench", help="where report.md, results.json, the CSVs and plots go")
    parser.add_argument("--dataset-size", type=int, default=None,
                        help=f"videos per epoch, for GPU-hours per epoch (unset: Kinetics-400 train, {KINETICS_TRAIN:,})")
    parser.add_argument("--manifest", help="take the dataset size from this stica-shard manifest's train split")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="bf16",
                        help="mixed precision of the model steps (GPU only)")
    parser.add_argument("--gpu-check", action="store_true",
                        help="prove the GPU path in one command (one GPU): the gpu tests, the model "
                             "preset, the step's levers (conv, compile), the loader in mixed/hybrid/cpu modes, 120 "
                             "trainer steps on generated shards, the trainer at batch 8/32/largest eager and compiled; "
                             "without a GPU it runs what it can and lists what it skipped")
    parser.add_argument("--parts", default=",".join(gpu_check.NAMES),
                        help="with --gpu-check: run these parts only, merged into the report already in --out "
                             "(the gpu tests part re-runs only the tests that did not pass)")
    parser.add_argument("--budget", type=float, default=None,
                        help="with --gpu-check: seconds this call may take; a part that would not finish in what is "
                             "left is not started, and the report names the --parts call that finishes the rest")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.gpu_check:
        return gpu_check.main(Path(args.out), PRESETS["full"], tuple(args.parts.split(",")), args.budget)
    preset = "quick" if args.quick else "full"
    p = PRESETS[preset]
    modes = set(args.modes.split(","))
    if modes - {"model"} and not args.shards:
        parser.error("--shards is needed for the loader, clipcost and e2e modes (or --modes model)")
    size = args.dataset_size or KINETICS_TRAIN
    if args.manifest:
        size = load_manifest(Path(args.manifest).parent)["splits"]["train"]["samples"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = amp_dtype(args.amp, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"preset": preset, "device": device_name(device), "dataset_size": size, "settings": p,
               "cpu_cores": os.cpu_count() or 1}
    if "model" in modes:
        results["model"] = run_model(p, device, amp, size)
    # The loader benchmarks need DALI and PyAV: imported past --gpu-check and the model table, which need torch only.
    from stica.tools.bench_loader import clip_cost, cpu_side, epoch_boundary, profile, run_loader, run_soak

    contents = [("generated scenes", args.shards)] + ([("camera footage", args.footage_shards)]
                                                      if args.footage_shards else [])
    if "loader" in modes:
        results["loader"] = [r for name, shards in contents
                             for r in run_loader(shards, p, ["dali", "reference", "torchcodec", "spdl"], name)]
    if "clipcost" in modes:
        # Starts at 0, the middle and the end of a 10-s video (clamped to shorter videos).
        results["clip_cost"] = [{"start": r["start"], "seg_frames": r["seg_frames"],
                                 "ms_per_clip": r["ms_per_clip"]["median"], "ms_min": r["ms_per_clip"]["min"],
                                 "ms_max": r["ms_per_clip"]["max"]}
                                for r in clip_cost(args.shards, [0, 135, 270], batch_size=p["loader_batch"])]
    if "profile" in modes:
        results["profile"] = profile(args.shards, batch_size=p["loader_batch"], batches=p["loader_batches"],
                                     repeats=p["repeats"])
        results["epoch_boundary"] = epoch_boundary(args.shards, batch_size=p["loader_batch"])
        results["cpu_side"] = [{"content": name, **r} for name, shards in contents
                               for r in cpu_side(shards, batch_size=p["loader_batch"], threads=p["parallel"][-1],
                                                 batches=p["loader_batches"], repeats=p["repeats"])]
        write_csv(results["profile"], out / "profile.csv")
        write_csv(results["cpu_side"], out / "cpu_side.csv")
        plot_profile(results, out / "profile.png")
    if "soak" in modes:
        results["soak"] = run_soak(args.shards, args.soak_epochs)
        write_csv(results["soak"], out / "soak.csv")
        plot_soak(results["soak"], out / "soak.png")
    if "e2e" in modes:
        results["end_to_end"] = run_end_to_end(args.shards, p, "dali")
    report = markdown(results)
    print(report)
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_csv(results.get("model", []), out / "model.csv")
    write_csv(results.get("loader", []), out / "loader.csv")
    write_csv(results.get("clip_cost", []), out / "clip_cost.csv")
    plot(results, out / "bench.png")
    print(f"[bench] wrote report.md, results.json, the CSVs and bench.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
