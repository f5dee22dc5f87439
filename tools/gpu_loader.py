"""The --gpu-check parts that read shards: they need PyAV to pack and DALI (or spdl-io) to read,
imported where used, so that the runner and the torch parts load without them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

from stica.tools.bench_model import STICA
from stica.tools.bench_train import run_end_to_end
from stica.tools.gpu_torch import missing

NVDEC_SESSIONS = (1, 2, 4, 7, 14)  # an H100 or H200 has 7 NVDEC engines; SPDL found more than 14 decoders worse


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
    if not missing("spdl.io"):  # SPDL's own NVDEC path, beside ours, where spdl-io is installed
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
