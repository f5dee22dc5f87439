"""`stica-bench --gpu-check`: the GPU path proven by one command on one GPU. The parts up to
end_to_end took under 8 minutes on an H100; step_levers and end_to_end_batches compile the model
several times, so on a machine lent by the minute run them as a second call (`--parts`).

Runs the gpu-marked tests, the model preset (Table 1f strategies, bf16), the STiCA step's levers
(model.conv, train.compile), NVDEC's smallest frame, the loader in nvdec, mixed, hybrid and cpu
modes beside the reference loader, the CPU time per clip of each part of the hybrid loader's CPU
side, NVDEC vs CPU clip cost, the nvdec mode with 1-14 decoder sessions (VP9 and H.264, NVDEC
utilisation) and the trainer fed by it, 120 end-to-end trainer steps on generated
real-looking shards at 128 px, and the trainer at batch 8, 32 and the largest, eager and compiled. Every part
runs on its own: one that fails is reported with its error and the rest still run. Writes
report.md, results.json, CSVs and bench.png naming the GPU, the date and the commit. Without a
GPU it runs what it can, exits 0 and lists what it skipped.

`--parts` runs some parts only and merges them into the report already in `--out`, so a check
interrupted by a time limit (or split across calls that bring its dependencies) is finished
without redoing what passed: the gpu tests part re-runs only the tests that did not pass.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from stica.tools.bench_loader import cpu_side
from stica.tools.bench_model import run_model
from stica.tools.bench_train import run_end_to_end
from stica.tools.measure import KINETICS_TRAIN, device_name, loader_table, write_csv

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"clips_per_s": 150.0, "data_wait_pct": 5.0, "feature_vs_two_rgb": 1.05}


class Skip(Exception):
    """A part that cannot run on this machine, with the reason."""


PARTS = ("gpu_tests", "model", "step_levers", "shards", "nvdec_smallest_frame", "loader", "loader_cpu_side", "clip_cost",
         "nvdec", "end_to_end", "end_to_end_batches")
NVDEC_SESSIONS = (1, 2, 4, 7, 14)  # an H100 or H200 has 7 NVDEC engines; SPDL found more than 14 decoders worse
STICA = "Feature crops (2x6^2 + 4x4^2, 2x3 + 1x2)"


def _git_commit() -> str:
    if os.environ.get("STICA_COMMIT"):  # a copy of the tree without .git (a remote GPU machine)
        return os.environ["STICA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name, package in (("dali", "nvidia-dali-cuda120"), ("pyav", "av"), ("spdl_io", "spdl-io")):
        try:
            out[name] = version(package)
        except PackageNotFoundError:  # on the GPU machine DALI may be another CUDA build's package
            out[name] = None
    if out["dali"] is None:
        try:
            out["dali"] = __import__("nvidia.dali", fromlist=["__version__"]).__version__
        except ImportError:
            pass
    return out


def gpu_tests(out: Path, timeout: float, before: dict | None = None) -> dict:
    """pytest -m gpu; given an earlier result, only the tests that did not pass then run again."""
    xml = out / "gpu_tests.xml"
    kept = [c for c in (before or {}).get("cases", []) if c["outcome"] == "passed"]
    deselect = [arg for c in kept for arg in ("--deselect", c["nodeid"])]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                           f"--junitxml={xml}", *deselect, "tests"], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    with open(out / "gpu_tests.log", "a") as log:
        log.write(proc.stdout + proc.stderr)
    if not xml.exists():
        raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {proc.stderr[-500:]}")
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome, detail = {"failure": "failed"}.get(kind, kind), (node.get("message") or "")[:300]
        nodeid = case.get("classname").replace(".", "/") + ".py::" + case.get("name")
        cases.append({"test": case.get("name"), "nodeid": nodeid, "outcome": outcome, "detail": detail,
                      "seconds": float(case.get("time", 0))})
    cases = kept + cases
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"exit_code": proc.returncode, **counts, "cases": cases}


def make_shards(root: Path, videos: int, seconds: float, codec: str = "vp9") -> Path:
    """Real-looking 228x128 clips with sound, packed at the default 128-px short side."""
    from stica.tools.shard import main as shard_main
    from stica.tools.synth import write_scene

    (root / "videos" / "scene").mkdir(parents=True, exist_ok=True)
    for i in range(videos):
        path = root / "videos" / "scene" / f"scene{i:04d}.mp4"
        if not path.exists():
            write_scene(path, seed=i, seconds=seconds)
    shards = root / f"shards-{codec}"
    args = ["pack", "--root", str(root / "videos"), "--out", str(shards), "--codec", codec,
            "--workers", str(os.cpu_count() or 1)]
    try:
        shard_main(args)  # resumes (or finds done) what an earlier --parts call packed
    except SystemExit:  # packed by another version of the packer, with other options: start again
        shutil.rmtree(shards)
        shard_main(args)
    return shards


def nvdec_smallest_frame() -> list[dict]:
    """Which frame sizes NVDEC decodes, per codec: one short file of each size through the mixed decoder."""
    import io

    import av
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    rows = []
    for codec, encoder, fmt in (("vp9", "libvpx-vp9", "webm"), ("h264", "libx264", "mp4")):
        for side in (48, 64, 96, 112, 128, 144):
            buf = io.BytesIO()
            with av.open(buf, "w", format=fmt) as c:
                s = c.add_stream(encoder, rate=30)
                s.width = s.height = side
                s.pix_fmt = "yuv420p"
                for i in range(8):
                    frame = av.VideoFrame.from_ndarray(np.full((side, side, 3), 20 * i, np.uint8), format="rgb24")
                    c.mux(s.encode(frame))
                c.mux(s.encode())
            data = np.frombuffer(buf.getvalue(), np.uint8)

            @pipeline_def(batch_size=1, num_threads=1, device_id=0)
            def pipe():
                return fn.decoders.video(fn.external_source(source=lambda: [data], batch=True), device="mixed")

            try:
                p = pipe()
                p.build()
                (frames,) = p.run()
                shape = frames.as_cpu().at(0).shape
                rows.append({"codec": codec, "side": side, "decoded": True, "frames": int(shape[0]), "error": ""})
            except Exception as e:
                rows.append({"codec": codec, "side": side, "decoded": False, "frames": 0,
                             "error": str(e).strip().splitlines()[0][:200]})
    return rows


def loader_modes(shards: Path, gpu: bool, batches: int, repeats: int) -> list[dict]:
    from stica.tools.bench_loader import loader_throughput

    cores = os.cpu_count() or 1
    threads = min(cores, 8)
    rows = []
    for backend, mode in (("dali", "nvdec"), ("dali", "mixed"), ("dali", "hybrid"), ("dali", "cpu"),
                          ("reference", "cpu")):
        if mode != "cpu" and not gpu:
            continue
        r = loader_throughput(str(shards), backend, threads, batch_size=8, batches=batches, repeats=repeats,
                              warmup=2, overrides=[f"data.device={mode}"])
        rate = r["clips_per_s"]
        rows.append({"backend": backend, "decode": mode, "threads_or_workers": threads, "clips_per_s": rate["median"],
                     "clips_per_s_min": rate["min"], "clips_per_s_max": rate["max"],
                     "clips_per_s_per_core": rate["median"] / threads,
                     "cpu_ms_per_clip": r["cpu_ms_per_clip"]["median"]})
        print(f"[gpu-check] loader {backend} {mode} x{threads}: {rate['median']:.1f} clips/s, "
              f"{rows[-1]['cpu_ms_per_clip']:.1f} CPU ms a clip", flush=True)
    return rows


def nvdec_sessions(shards: Path, h264_shards: Path, batches: int, repeats: int) -> list[dict]:
    """The nvdec mode with 1-14 decoder sessions on the VP9 shards, then on the same videos packed
    as H.264 beside DALI's mixed decoder there: clips/s, frames/s, the loader process's CPU ms per
    clip and the cores that makes busy, and NVDEC's utilisation (nvidia-smi dmon, mean over the run)."""
    from stica.tools.bench_loader import loader_throughput

    rows = []
    runs = [(shards, "nvdec", n) for n in NVDEC_SESSIONS] + [(h264_shards, "nvdec", 7), (h264_shards, "mixed", 7)]
    for where, mode, sessions in runs:
        codec = json.loads((where / "manifest.json").read_text())["options"]["codec"]
        with _DecoderUtilisation() as util:
            r = loader_throughput(str(where), "dali", min(os.cpu_count() or 1, 8), batch_size=8, batches=batches,
                                  repeats=repeats, warmup=2, overrides=[f"data.device={mode}",
                                                                        f"data.sessions={sessions}"])
        rate, cpu = r["clips_per_s"]["median"], r["cpu_ms_per_clip"]["median"]
        rows.append({"codec": codec, "decode": mode, "sessions": sessions if mode == "nvdec" else None,
                     "clips_per_s": rate, "clips_per_s_min": r["clips_per_s"]["min"],
                     "clips_per_s_max": r["clips_per_s"]["max"], "frames_per_s": rate * 30, "cpu_ms_per_clip": cpu,
                     "cpu_cores_busy": cpu * rate / 1000, "nvdec_util_pct": util.mean})
        print(f"[gpu-check] {codec} {mode} sessions={sessions}: {rate:.1f} clips/s, {cpu:.1f} CPU ms a clip, "
              f"NVDEC {util.mean}%", flush=True)
    rows.append(spdl_nvdec_decode(shards))
    return rows


def spdl_nvdec_decode(shards: Path, clips: int = 256) -> dict:
    """SPDL's own NVDEC path beside the nvdec mode: spdl-io's one-call decode_packets_nvdec per
    segment of a clip (demux, decode, RGB), on one thread, decode only (no augmentation)."""
    import spdl.io

    from stica.shards import clip_segments, parse_info, read_index, read_members, shard_paths

    tars, idxs = shard_paths(str(shards), "train")
    work = []
    with open(tars[0], "rb") as f:
        for _, members in read_index(idxs[0]):
            segs, info = read_members(f, members, ("segs", "info")).values()
            meta, offsets = parse_info(info)
            start = (len(work) * 7) % max(1, meta["num_frames"] - 30)
            work.append([segment for segment, _, _ in clip_segments(segs, meta, offsets, start, 30)])
    work = (work * (clips // len(work) + 1))[:clips]
    cuda = spdl.io.cuda_config(0)
    for segments in work[:8]:  # warm-up: the thread's decoder is created
        for segment in segments:
            spdl.io.decode_packets_nvdec(spdl.io.demux_video(segment), device_config=cuda)
    torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    for segments in work:
        for segment in segments:
            spdl.io.decode_packets_nvdec(spdl.io.demux_video(segment), device_config=cuda)
    torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    rate = clips / seconds
    return {"codec": "vp9", "decode": "spdl decode_packets_nvdec (decode only, 1 thread)", "sessions": 1,
            "clips_per_s": rate, "clips_per_s_min": rate, "clips_per_s_max": rate, "frames_per_s": rate * 30,
            "cpu_ms_per_clip": cpu * 1000 / clips, "cpu_cores_busy": cpu / seconds, "nvdec_util_pct": None}


class _DecoderUtilisation:
    """nvidia-smi dmon's decoder utilisation (%), sampled each second while the block runs."""

    def __enter__(self):
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1"], stdout=subprocess.PIPE,
                                         text=True)
        return self

    def __exit__(self, *exc):
        self.mean = None
        if self.proc is None:
            return
        self.proc.terminate()
        lines = self.proc.communicate()[0].splitlines()
        header = next((line.lstrip("# ").split() for line in lines if line.startswith("# gpu")), None)
        if header and "dec" in header:
            values = [float(line.split()[header.index("dec")]) for line in lines
                      if not line.startswith("#") and len(line.split()) == len(header) and
                      line.split()[header.index("dec")].replace(".", "").isdigit()]
            self.mean = round(sum(values) / len(values), 1) if values else None


def fastest_modes(results: dict) -> dict:
    """Per codec, the loader mode with the most clips/s in this report: what data.gpu_check hands
    to data.device=auto (pipelines/loader.py: measured_fastest)."""
    best = {}
    for r in (results.get("loader") if isinstance(results.get("loader"), list) else []):
        if r["backend"] == "dali":
            best.setdefault("vp9", []).append((r["clips_per_s"], r["decode"]))
    for r in (results.get("nvdec") if isinstance(results.get("nvdec"), list) else []):
        if r["decode"] in ("nvdec", "mixed"):  # loader modes, not the decode-only SPDL row
            best.setdefault(r["codec"], []).append((r["clips_per_s"], r["decode"]))
    return {codec: max(rows)[1] for codec, rows in best.items()}


def clip_costs(shards: Path, gpu: bool) -> list[dict]:
    from stica.tools.bench_loader import clip_cost

    rows = []
    for mode in ("cpu", "mixed") if gpu else ("cpu",):
        for r in clip_cost(str(shards), [0, 75, 150], batch_size=8, mode=mode):
            rows.append({"mode": mode, "start": r["start"], "ms_per_clip": r["ms_per_clip"]["median"],
                         "ms_min": r["ms_per_clip"]["min"], "ms_max": r["ms_per_clip"]["max"]})
    return rows


def step_levers(preset: dict, device, amp) -> list[dict]:
    """The STiCA step (the paper's crops, transformer pooling, bf16, channels-last, model only) with
    each lever the trainer has: model.conv (conv3d | conv2d, eager), then train.compile (trunks,
    heads, all) with the faster conv. Which conv is faster decides its default."""
    from stica.config import load_config
    from stica.tools.bench_model import measure_step, table_1f
    from stica.tools.measure import DEFAULT_CONFIG

    strategy = next(s for s in table_1f() if s.name == STICA)
    rows = []

    def row(overrides):
        cfg = load_config(DEFAULT_CONFIG, [f"model.width={preset['width']}", *overrides])
        m = measure_step(cfg, strategy, preset["batch"], preset["frames"], preset["size"], device, amp,
                         preset["repeats"], preset["steps"], preset["warmup"])
        rows.append({"conv": cfg.model.conv, "compile": cfg.train.compile, "batch": preset["batch"],
                     "step_s": m["step_s"]["median"], "step_s_min": m["step_s"]["min"],
                     "step_s_max": m["step_s"]["max"], "ops": sum(m["ops"].values()) if m["ops"] else None})
        print(f"[gpu-check] step conv={rows[-1]['conv']} compile={rows[-1]['compile']}: "
              f"{rows[-1]['step_s'] * 1000:.1f} ms", flush=True)

    for conv in ("conv3d", "conv2d"):
        row([f"model.conv={conv}"])
    faster = min(rows, key=lambda r: r["step_s"])["conv"]
    for regions in ("trunks", "heads", "all"):
        row([f"model.conv={faster}", f"train.compile={regions}"])
    return rows


def end_to_end_batches(shards: str, results: dict, gpu: bool) -> list[dict]:
    """The trainer end to end at the batches a user would pick on one GPU (8 as in the paper, 32,
    and the largest the model part found room for, less a tenth for the loader), each eager and
    with train.compile=all: clips/s, data wait, loader threads, which side bounds it."""
    if not gpu:
        return [run_end_to_end(shards, dict(width=0.125, batch=4, e2e_steps=4, log_every=1), "dali",
                               ["data.device=auto"])]
    model = results.get("model") if isinstance(results.get("model"), list) else []
    largest = next((r.get("max_batch") for r in model if r["strategy"] == STICA and r["pooling"] ==
                    "transformer (2 layers)" and r.get("max_batch")), 64)
    rows = []
    for batch in sorted({8, 32, max(8, int(largest * 0.9) // 8 * 8)}):
        for regions in ("none", "all"):
            rows.append(run_end_to_end(shards, dict(width=1.0, batch=batch, e2e_steps=60, log_every=10), "dali",
                                       ["data.device=auto", f"train.compile={regions}"]))
            print(f"[gpu-check] end to end batch {batch} compile={regions}: {rows[-1]['clips_per_s']:.1f} clips/s, "
                  f"data wait {rows[-1]['data_wait_pct']:.1f}%", flush=True)
    return rows


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
        out += ["## Model only (synthetic tensors, bf16, batch 8 per GPU)", "",
                "| pooling | strategy | ms/step (min-max) | clips/s | vs Default | GPU-h/epoch | paper GPU-h (V100) | peak GiB | max batch |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in results["model"]:
            paper = "-" if r["paper_gpu_hours_v100"] is None else f"{r['paper_gpu_hours_v100']:.1f}"
            out.append(f"| {r['pooling']} | {r['strategy']} | {r['step_s'] * 1000:.1f} ({r['step_s_min'] * 1000:.1f}-"
                       f"{r['step_s_max'] * 1000:.1f}) | {r['clips_per_s']:.1f} | {r['relative_to_default']:.2f}x | "
                       f"{r['gpu_hours_per_epoch']:.2f} | {paper} | {r['peak_mem_gib'] or 0:.2f} | "
                       f"{r.get('max_batch', '-')} |")
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


def main(out: Path, preset: dict, parts: tuple[str, ...] = PARTS) -> int:
    """preset: stica-bench's full model preset (batch 8 per GPU, repeats after warm-up).
    parts: a subset of PARTS runs those alone and merges them into out/results.json if it exists."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"stica-bench --gpu-check: unknown part(s) {sorted(unknown)}; parts are {', '.join(PARTS)}")
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    t0 = time.perf_counter()
    header = {"device": device_name(device), "date": datetime.date.today().isoformat(), "commit": _git_commit(),
              "versions": _versions(), "cpu_cores": os.cpu_count()}
    earlier = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    if earlier and set(parts) != set(PARTS) and earlier["header"]["device"] == header["device"]:
        results = {**earlier, "header": header}
        results["skipped"] = [s for s in earlier["skipped"] if s.split(":")[0] not in parts]
        t0 -= earlier.get("seconds", 0)
    else:
        results = {"header": header, "skipped": []}

    def part(name, fn, needs_gpu=False):
        if name not in parts:  # looked up when called: the shards part adds itself where others need it
            return results.get(name)
        if needs_gpu and not gpu:
            results["skipped"].append(f"{name}: needs a CUDA GPU")
            return None
        print(f"[gpu-check] {name} ({time.perf_counter() - t0:.0f} s so far)", flush=True)
        try:
            results[name] = fn()
        except Skip as e:
            results["skipped"].append(f"{name}: {e}")
        except Exception:  # report it and go on: one broken part must not hide the others' figures
            results[name] = {"traceback": traceback.format_exc()}
            print(f"[gpu-check] {name} FAILED:\n{results[name]['traceback']}", flush=True)
        # Saved after every part: a check killed at a time limit keeps what it measured (merge with --parts).
        results["seconds"] = time.perf_counter() - t0
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        return results.get(name)

    part("gpu_tests", lambda: gpu_tests(out, timeout=300, before=results.get("gpu_tests")))
    if isinstance(results.get("gpu_tests"), dict) and results["gpu_tests"].get("passed") == 0 and not gpu:
        results["skipped"].append("gpu tests: every one skipped (no CUDA GPU)")
    # The paper's model, bf16, the largest batch searched for Default and STiCA's strategy only (time).
    part("model", lambda: run_model(preset, device, torch.bfloat16, KINETICS_TRAIN,
                                    largest_for=("Default", "Feature crops (2x6")), needs_gpu=True)
    part("step_levers", lambda: step_levers(preset, device, torch.bfloat16), needs_gpu=True)
    # A fixed place, so that a later `--parts` call finds the videos and shards (packing resumes).
    work = Path(tempfile.gettempdir()) / "stica-gpu-check"

    def shards():
        missing = [m for m in ("av", "nvidia.dali") if importlib.util.find_spec(m.split(".")[0]) is None]
        if missing:
            raise Skip(f"{', '.join(missing)} not installed (the loader parts need PyAV to pack and DALI to read)")
        return str(make_shards(work, videos=96 if gpu else 16, seconds=6.0 if gpu else 3.0))

    def nvdec():
        if importlib.util.find_spec("av") is None or importlib.util.find_spec("nvidia") is None:
            raise Skip("needs PyAV (to encode) and DALI (to decode)")
        return nvdec_smallest_frame()

    part("nvdec_smallest_frame", nvdec, needs_gpu=True)
    on_shards = ("loader", "loader_cpu_side", "clip_cost", "nvdec", "end_to_end", "end_to_end_batches")
    if set(on_shards) & set(parts):
        parts = (*parts, "shards")
    shard_dir = part("shards", shards)
    if isinstance(shard_dir, str):
        part("loader", lambda: loader_modes(Path(shard_dir), gpu, batches=20 if gpu else 2, repeats=3 if gpu else 1))
        if not gpu:
            results["skipped"].append("loader mixed and hybrid modes: need a CUDA GPU")
        # Where the hybrid loader's CPU time goes, part by part, on as many threads as the loader rows.
        part("loader_cpu_side", lambda: cpu_side(shard_dir, batch_size=8, threads=min(os.cpu_count() or 1, 8),
                                                 batches=20 if gpu else 2, repeats=3 if gpu else 1))
        part("clip_cost", lambda: clip_costs(Path(shard_dir), gpu))

        def nvdec_part():
            h264 = make_shards(work, videos=96, seconds=6.0, codec="h264")
            rows = nvdec_sessions(Path(shard_dir), h264, batches=20, repeats=3)
            best = max((r for r in rows if r["codec"] == "vp9"), key=lambda r: r["clips_per_s"])
            results["end_to_end_nvdec"] = run_end_to_end(shard_dir, dict(width=1.0, batch=8, e2e_steps=120,
                                                                         log_every=10), "dali",
                                                         ["data.device=nvdec", f"data.sessions={best['sessions']}"])
            return rows

        part("nvdec", nvdec_part, needs_gpu=True)
        e2e = dict(width=1.0, batch=8, e2e_steps=120, log_every=10) if gpu else \
            dict(width=0.125, batch=4, e2e_steps=4, log_every=1)
        part("end_to_end", lambda: run_end_to_end(shard_dir, e2e, "dali", ["data.device=auto"]))
        part("end_to_end_batches", lambda: end_to_end_batches(shard_dir, results, gpu))
        if not gpu:
            results["skipped"].append("end to end at full width and >=100 steps: needs a CUDA GPU (ran 4 CPU steps)")
            results["skipped"].append("end to end at batch 8, 32 and the largest, eager and compiled: needs a CUDA GPU "
                                      "(ran batch 4 eager)")
    else:
        results["skipped"] += [f"{p}: no shards" for p in on_shards if p in parts]
    results["fastest_mode"] = fastest_modes(results)
    if gpu:
        results["targets"] = targets(results)
    else:
        results["skipped"].append("targets (150 clips/s, data wait < 5%, feature crops <= 1.05x two RGB crops): "
                                  "GPU figures")
    results["seconds"] = time.perf_counter() - t0
    report = markdown(results)
    print(report)
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    for name in ("model", "loader", "loader_cpu_side", "clip_cost", "nvdec", "nvdec_smallest_frame"):
        if isinstance(results.get(name), list):
            write_csv(results[name], out / f"{name}.csv")
    plot(results, out / "bench.png")
    print(f"[gpu-check] wrote report.md, results.json, the CSVs and bench.png to {out}")
    return 0
