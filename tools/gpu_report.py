"""The --gpu-check report: targets with verdicts, report.md's tables, bench.png."""
from __future__ import annotations

from pathlib import Path

from stica.tools.bench_model import STICA
from stica.tools.measure import KINETICS_TRAIN, loader_table

TARGETS = {"clips_per_s": 150.0, "data_wait_pct": 5.0, "feature_vs_two_rgb": 1.05}


def targets(results: dict) -> list[dict]:
    """The issue's targets, each with the measured figure and a verdict."""
    rows = []
    e2e = results.get("end_to_end") or {}
    if "clips_per_s" in e2e:
        rows.append({"target": f"end-to-end clips/s >= {TARGETS['clips_per_s']:.0f}", "measured": e2e["clips_per_s"],
                     "met": e2e["clips_per_s"] >= TARGETS["clips_per_s"], "note": f"bound by the {e2e['bound_by']}"})
        rows.append({"target": f"data wait < {TARGETS['data_wait_pct']:.0f}%", "measured": e2e["data_wait_pct"],
                     "met": e2e["data_wait_pct"] < TARGETS["data_wait_pct"], "note": ""})
    model = {(r["pooling"], r["strategy"]): r for r in results.get("model") or [] if isinstance(r, dict)}
    for pooling in ("average", "transformer (2 layers)"):
        two, stica = model.get((pooling, "Two RGB crops (2x112^2)")), model.get((pooling, STICA))
        if two and stica:
            ratio = stica["step_s"] / two["step_s"]
            rows.append({"target": f"feature crops <= {TARGETS['feature_vs_two_rgb']}x two RGB crops", "measured": ratio,
                         "met": ratio <= TARGETS["feature_vs_two_rgb"], "note": f"model-only step, {pooling} pooling"})
    batches = results.get("end_to_end_batches") if isinstance(results.get("end_to_end_batches"), list) else []
    if batches:
        best = max(batches, key=lambda r: r["clips_per_s"])
        rows.append({"target": f"end-to-end clips/s >= {TARGETS['clips_per_s']:.0f} at the batch a user would pick",
                     "measured": best["clips_per_s"], "met": best["clips_per_s"] >= TARGETS["clips_per_s"]
                     and best["data_wait_pct"] < TARGETS["data_wait_pct"],
                     "note": f"batch {best['batch']}, compile {best['compile']}, data wait {best['data_wait_pct']:.1f}%"})
    nvdec = [r for r in results.get("nvdec") or [] if isinstance(r, dict) and r["decode"] == "nvdec"]
    if nvdec:
        best = max(nvdec, key=lambda r: r["clips_per_s"])
        rows.append({"target": "nvdec loader >= 300 clips/s with <= 1 CPU core busy", "measured": best["clips_per_s"],
                     "met": best["clips_per_s"] >= 300 and best["cpu_cores_busy"] <= 1.0,
                     "note": f"{best['codec']}, {best['sessions']} sessions, {best['cpu_cores_busy']:.2f} cores busy"})
    e2e = results.get("end_to_end_nvdec") or {}
    if "clips_per_s" in e2e:
        rows.append({"target": f"data wait < {TARGETS['data_wait_pct']:.0f}% fed by the nvdec loader",
                     "measured": e2e["data_wait_pct"], "met": e2e["data_wait_pct"] < TARGETS["data_wait_pct"],
                     "note": f"{e2e['clips_per_s']:.1f} clips/s end to end, batch {e2e['batch']}"})
    return rows


def _table(title: str, columns: list[str]) -> list[str]:
    return [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def markdown(results: dict) -> str:
    h = results["header"]
    out = [f"# stica-bench --gpu-check on {h['device']}", "",
           f"{h['date']}, commit {h['commit']}, torch {h['versions']['torch']} (CUDA {h['versions']['cuda']}), "
           f"DALI {h['versions']['dali']}, PyAV {h['versions']['pyav']}, spdl-io {h['versions'].get('spdl_io')}; "
           f"{h['cpu_cores']} CPU cores; "
           f"{results['seconds']:.0f} s in all.", ""]
    if results.get("targets"):
        out += ["## Targets", "", "| target | measured | met | note |", "|---|---|---|---|"]
        out += [f"| {t['target']} | {t['measured']:.3g} | {'yes' if t['met'] else 'NO'} | {t['note']} |"
                for t in results["targets"]]
        out.append("")
    tests = results.get("gpu_tests")
    if isinstance(tests, dict) and "cases" in tests:
        out += ["## GPU tests (`pytest -m gpu`)", "",
                f"{tests['passed']} passed, {tests['failed']} failed, {tests['error']} errors, "
                f"{tests['skipped']} skipped.", "", "| test | outcome | detail |", "|---|---|---|"]
        out += [f"| {c['test']} | {c['outcome']} | {c['detail'][:160]} |" for c in tests["cases"]]
        out.append("")
    if isinstance(results.get("nvdec_smallest_frame"), list):
        out += ["## NVDEC: which square frame sizes decode", "", "| codec | side | decoded | error |", "|---|---|---|---|"]
        out += [f"| {r['codec']} | {r['side']} | {'yes' if r['decoded'] else 'no'} | {r['error'][:120]} |"
                for r in results["nvdec_smallest_frame"]]
        out.append("")
    if isinstance(results.get("model"), list):
        out += ["## Model only (synthetic tensors, bf16, batch 8 and 32 per GPU)", "",
                "| batch | pooling | strategy | ms/step (min-max) | clips/s | vs Default | GPU-h/epoch | paper GPU-h (V100) | peak GiB | max batch | ops | GFLOP |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["model"]:
            paper = "-" if r["paper_gpu_hours_v100"] is None else f"{r['paper_gpu_hours_v100']:.1f}"
            out.append(f"| {r['batch']} | {r['pooling']} | {r['strategy']} | {r['step_s'] * 1000:.1f} "
                       f"({r['step_s_min'] * 1000:.1f}-{r['step_s_max'] * 1000:.1f}) | {r['clips_per_s']:.1f} | "
                       f"{r['relative_to_default']:.2f}x | {r['gpu_hours_per_epoch']:.2f} | {paper} | "
                       f"{r['peak_mem_gib'] or 0:.2f} | {r.get('max_batch', '-')} | {r['ops']:,} | "
                       f"{r['gflops'] or 0:.1f} |")
        out.append("")
    if isinstance(results.get("step_levers"), list):
        out += ["## The STiCA step's levers (model only, transformer pooling, bf16, channels-last)", "",
                "| model.conv | train.compile | batch | ms/step (min-max) | ops |", "|---|---|---|---|---|"]
        out += [f"| {r['conv']} | {r['compile']} | {r['batch']} | {r['step_s'] * 1000:.1f} ({r['step_s_min'] * 1000:.1f}-"
                f"{r['step_s_max'] * 1000:.1f}) | {r['ops'] or '-'} |" for r in results["step_levers"]]
        out.append("")
    if isinstance(results.get("loader"), list):
        out += ["## Loader only (two 112^2 views + spectrogram, 30 frames, batch 8)", "",
                *loader_table(results["loader"]), ""]
    if isinstance(results.get("loader_cpu_side"), list):
        out += ["## CPU time per clip, part by part (batch 8; each part row adds to the row above)", "",
                "| part | CPU ms per clip (fastest, slowest) | this part |", "|---|---|---|"]
        out += [f"| {r['stage']} | {r['note']} | |" if r["cpu_ms_per_clip"] is None else
                f"| {r['stage']} | {r['cpu_ms_per_clip']:.1f} ({r['ms_max']:.1f}) | "
                f"{'' if r['stage_ms'] is None else format(r['stage_ms'], '+.1f')} |" for r in results["loader_cpu_side"]]
        out.append("")
    if isinstance(results.get("clip_cost"), list):
        out += ["## Decode cost of a 30-frame clip by start frame (batch 8)", "",
                "| decoder | start | ms per clip (min-max) |", "|---|---|---|"]
        out += [f"| {r['mode']} | {r['start']} | {r['ms_per_clip']:.2f} ({r['ms_min']:.2f}-{r['ms_max']:.2f}) |"
                for r in results["clip_cost"]]
        out.append("")
    if isinstance(results.get("nvdec"), list):
        out += _table("The nvdec mode: decoder sessions (two views + spectrogram, 30 frames, batch 8)",
                      ["codec", "decode", "sessions", "clips/s (min-max)", "frames/s", "CPU ms per clip", "cores busy",
                       "NVDEC %"])
        out += [f"| {r['codec']} | {r['decode']} | {r['sessions'] or '-'} | {r['clips_per_s']:.1f} "
                f"({r['clips_per_s_min']:.1f}-{r['clips_per_s_max']:.1f}) | {r['frames_per_s']:.0f} | "
                f"{r['cpu_ms_per_clip']:.1f} | {r['cpu_cores_busy']:.2f} | {r['nvdec_util_pct'] or '-'} |"
                for r in results["nvdec"]]
        out += ["", f"Fastest mode per codec (what data.gpu_check hands to data.device=auto): "
                f"{results.get('fastest_mode') or '-'}", ""]
    e = results.get("end_to_end")
    if isinstance(e, dict) and "clips_per_s" in e:
        out += ["## End to end (the trainer on the generated shards)", "",
                f"{e['clips_per_s']:.1f} clips/s, data wait {e['data_wait_pct']:.1f}% (median of {e['steps_timed']} "
                f"logged windows after warm-up, {e['steps']} steps, data.device={e['device']}, width {e['width']}): "
                f"bound by the {e['bound_by']}. GPU-hours per Kinetics-400 epoch at this rate: "
                f"{KINETICS_TRAIN / e['clips_per_s'] / 3600:.1f} (paper, V100, STiCA: 30.0).", ""]
    if isinstance(results.get("end_to_end_batches"), list):
        out += _table("End to end by batch (the trainer on the generated shards)",
                      ["batch", "train.compile", "clips/s", "data wait %", "loader", "threads", "bound by", "GPU GiB",
                       "GPU-h per K400 epoch"])
        out += [f"| {r['batch']} | {r['compile']} | {r['clips_per_s']:.1f} | {r['data_wait_pct']:.1f} | {r['device']} | "
                f"{r['threads']} | {r['bound_by']} | {r['gpu_mem_gib'] or 0:.1f} | "
                f"{KINETICS_TRAIN / r['clips_per_s'] / 3600:.2f} |" for r in results["end_to_end_batches"]]
        out.append("")
    failed = {k: v["traceback"] for k, v in results.items() if isinstance(v, dict) and "traceback" in v}
    if failed:
        out += ["## Parts that failed", ""] + [f"- **{k}**: `{v.strip().splitlines()[-1][:300]}`"
                                                for k, v in failed.items()] + [""]
    if results.get("left_out"):
        out += ["## Left out by the budget", ""] + [f"- {p['part']} (about {p['expected_s']:.0f} s)"
                                                    for p in results["left_out"]]
        if results.get("finish_with"):
            out += ["", f"Finish them, merged into this report: `{results['finish_with']}`"]
        out.append("")
    if results.get("timings"):
        out += ["## Time by part", "", "| part | seconds |", "|---|---|"]
        out += [f"| {name} | {sec:.0f} |" for name, sec in results["timings"].items()] + [""]
    if results["skipped"]:
        out += ["## Skipped on this machine", ""] + [f"- {s}" for s in results["skipped"]] + [""]
    return "\n".join(out)


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    model = results.get("model") if isinstance(results.get("model"), list) else []
    model = [r for r in model if r["pooling"] == "average"]
    if model:
        axes[0].barh([r["strategy"] for r in model], [r["relative_to_default"] for r in model])
        axes[0].set_xlabel("step cost relative to Default (model only)")
        axes[0].invert_yaxis()
    else:
        axes[0].axis("off")
        axes[0].text(0.5, 0.5, "no model figures in this run (see report.md)", ha="center")
    loader = results.get("loader") if isinstance(results.get("loader"), list) else []
    bars = [(f"{r['backend']} {r['decode']}", r["clips_per_s"]) for r in loader]
    e2e = results.get("end_to_end") or {}
    if "clips_per_s" in e2e:
        bars.append(("trainer end to end", e2e["clips_per_s"]))
    if bars:
        axes[1].barh([b[0] for b in bars], [b[1] for b in bars], color=["C0"] * (len(bars) - 1) + ["C3"])
        axes[1].axvline(TARGETS["clips_per_s"], color="k", ls="--", lw=1, label="target")
        axes[1].set_xlabel("clips/s")
        axes[1].legend()
    fig.suptitle(f"stica-bench --gpu-check: {results['header']['device']} ({results['header']['date']}, "
                 f"{results['header']['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
