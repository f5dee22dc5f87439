"""Loader measurements for stica-bench: clips/s delivered, and what a clip costs by its start."""
from __future__ import annotations

import functools
import os
import statistics
import time

import numpy as np
import torch

from stica.config import load_config
from stica.media import decoder_missing
from stica.pipelines.loader import build_loader
from stica.tools.measure import DEFAULT_CONFIG, summarize, sync


def loader_throughput(shards: str, backend: str, parallel: int, batch_size: int = 8, batches: int | None = 10,
                      repeats: int = 3, warmup: int = 2, overrides: list[str] = (), config: str = DEFAULT_CONFIG) -> dict:
    """Clips/s (two views + spectrogram) after warm-up, and the process's CPU ms per clip (every
    thread of it; DataLoader workers are other processes and not counted); `parallel` is DALI
    threads or DataLoader workers. batches=None times whole epochs, boundaries included, after
    one warm-up epoch."""
    cfg = load_config(config, [f"data.shards={shards}", f"data.batch_size={batch_size}",
                               f"data.threads={parallel}", *overrides]).data
    loader = build_loader(cfg, backend=backend, workers=parallel)
    if batches is None:
        batches = warmup = len(loader)
    rates, cpu_ms = [], []
    stream = _forever(loader)
    for _ in range(warmup):
        next(stream)
    for _ in range(repeats):
        sync()
        t, c = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(stream)
        sync()  # GPU outputs are only ready once the device has finished them
        rates.append(batches * batch_size / (time.perf_counter() - t))
        cpu_ms.append((time.process_time() - c) * 1000 / (batches * batch_size))
    if hasattr(loader, "close"):
        loader.close()
    return {"backend": backend, "parallel": parallel, "batch_size": batch_size, "clips_per_s": summarize(rates),
            "cpu_ms_per_clip": summarize(cpu_ms), "device": getattr(loader, "device", "cpu")}


def _forever(loader):
    while True:
        yield from loader


def clip_cost(shards: str, starts: list[int], num_frames: int = 30, batch_size: int = 8, threads: int = 1,
              repeats: int = 5, mode: str = "cpu") -> list[dict]:
    """Decode-only cost of a clip starting at each of `starts` (clamped to the video), ms per clip,
    on the CPU decoder (mode cpu) or NVDEC (mixed)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    from stica.pipelines.clips import decode_clip, field, read_shards
    from stica.shards import load_manifest, shard_paths

    seg_frames = load_manifest(shards)["options"]["seg_frames"]
    tars, idxs = shard_paths(shards, "train")
    rows = []
    for start in starts:
        @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=0 if mode != "cpu" else None,
                      exec_dynamic=True)
        def pipe():
            segs, _, info, _ = read_shards(tars, idxs, 0, 1, shuffle=False, shuffle_buffer=1, seed=0)
            s = fn.reshape(fn.constant(idata=[start], dtype=types.INT32), shape=[])
            s = dmath.min(s, field(info, "num_frames") - num_frames)
            return decode_clip(segs, info, s, num_frames, seg_frames, mode)

        p = pipe()
        p.build()
        p.run()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            (out,) = p.run()
            if mode != "cpu":
                out.as_cpu()  # waits for the device
            times.append((time.perf_counter() - t) / batch_size * 1000)
        rows.append({"start": start, "seg_frames": seg_frames, "mode": mode, "ms_per_clip": summarize(times)})
    return rows


def run_loader(shards: str, p: dict, backends: list[str], content: str = "generated scenes") -> list[dict]:
    """Whole epochs of each loader, one row per backend and thread/worker count (DALI also per
    prefetch depth): epoch boundaries count, as in training. A backend that cannot run here
    (torchcodec or spdl without FFmpeg's libraries) gets one row saying why instead. `content` names
    what the shards hold: the loaders' ranking turns on it (tools/footage.py)."""
    rows = []
    cores = os.cpu_count() or 1
    for backend in backends:
        if backend in ("torchcodec", "spdl") and (why := decoder_missing(backend)):
            rows.append({"content": content, "backend": backend, "decode": "-", "threads_or_workers": "-", "prefetch": "-",
                         "clips_per_s": None, "clips_per_s_min": None, "clips_per_s_max": None,
                         "clips_per_s_per_core": None, "note": f"not measured: {why}"})
            print(f"[bench] loader {backend} not measured: {why}", flush=True)
            continue
        # DataLoader workers keep their own fixed prefetch (2 batches each).
        for prefetch in p["prefetch"] if backend == "dali" else ["-"]:
            for parallel in p["parallel"]:
                extra = [f"data.prefetch={prefetch}"] if backend == "dali" else []
                r = loader_throughput(shards, backend, parallel, batch_size=p["loader_batch"], batches=None,
                                      repeats=p["loader_epochs"], overrides=extra)
                rate = r["clips_per_s"]
                rows.append({"content": content, "backend": backend, "decode": r["device"], "threads_or_workers": parallel,
                             "prefetch": prefetch, "clips_per_s": rate["median"], "clips_per_s_min": rate["min"],
                             "clips_per_s_max": rate["max"], "clips_per_s_per_core": rate["median"] / min(parallel, cores),
                             "note": ""})
                print(f"[bench] loader {content}: {backend:>10} ({r['device']}) x{parallel} prefetch {prefetch}: "
                      f"{rate['median']:.1f} clips/s", flush=True)
    return rows


def resident_mib() -> float:
    """This process's resident memory now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(loader, epochs: int) -> list[float]:
    """Resident MiB after each of `epochs` whole epochs of `loader`."""
    rss = []
    for _ in range(epochs):
        for _ in loader:
            pass
        rss.append(resident_mib())
    return rss


def growth_per_epoch(rss: list[float], skip: int) -> float:
    """How fast resident memory rises per epoch after `skip` warm-up epochs (pools filling): the
    median of the last half against the median of the first half, over the epochs between.
    Readings swing by tens of MiB from epoch to epoch (the next epoch's buffers come and go),
    which made a least-squares slope over 16 epochs read +-2 MiB/epoch on a flat loader."""
    ys = rss[skip:]
    half = len(ys) // 2
    return (statistics.median(ys[half:]) - statistics.median(ys[:half])) / half


def run_soak(shards: str, epochs: int) -> list[dict]:
    """Resident memory per epoch of the pretraining and evaluation DALI loaders and the reference loader."""
    rows = []
    for backend, kind in (("dali", "pretrain"), ("dali", "eval"), ("reference", "pretrain")):
        cfg = load_config(DEFAULT_CONFIG, [f"data.shards={shards}", "data.batch_size=8", "data.threads=2",
                                           "data.device=cpu", "data.eval_clips=2"]).data
        rss = soak(build_loader(cfg, kind=kind, backend=backend, workers=1), epochs)
        print(f"[bench] soak {backend} {kind}: {rss[0]:.0f} -> {rss[-1]:.0f} MiB over {epochs} epochs", flush=True)
        rows += [{"loader": f"{backend} {kind}", "epoch": e + 1, "rss_mib": r} for e, r in enumerate(rss)]
    return rows


# Each stage turns one more part of the pretraining graph on; a stage's cost is the difference
# from the row above. The first row is what every clip pays: read, decode, one crop resized to
# 112^2, normalised, laid out C,T,H,W, the audio window and its spectrogram, and the hand-off.
PROFILE_STAGES = [
    ("decode, 1 view (crop, resize, normalise, layout), audio, hand-off",
     ["data.views=1", "data.flip_prob=0", "data.jitter_prob=0", "data.grayscale_prob=0", "data.blur_prob=0"]),
    ("+ flip", ["data.views=1", "data.jitter_prob=0", "data.grayscale_prob=0", "data.blur_prob=0"]),
    ("+ colour jitter", ["data.views=1", "data.grayscale_prob=0", "data.blur_prob=0"]),
    ("+ grayscale", ["data.views=1", "data.blur_prob=0"]),
    ("+ blur", ["data.views=1"]),
    ("+ second view (the default graph)", []),
]


def profile(shards: str, batch_size: int = 8, batches: int = 6, repeats: int = 5) -> list[dict]:
    """ms per clip per core of each stage of the DALI CPU graph (one thread), the stages measured
    round-robin so that a slow spell of a shared machine falls on all of them alike."""
    loaders = []
    for name, overrides in PROFILE_STAGES:
        cfg = load_config(DEFAULT_CONFIG, [f"data.shards={shards}", f"data.batch_size={batch_size}", "data.threads=1",
                                           "data.device=cpu", *overrides]).data
        stream = _forever(build_loader(cfg, backend="dali"))
        next(stream)
        loaders.append((name, stream, []))
    for _ in range(repeats):
        for name, stream, times in loaders:
            # A pipeline left idle has run ahead into its prefetch queue (and refilled it while
            # the previous stage was timed): take those batches untimed, then time fresh work.
            for _ in range(cfg.prefetch + 1):
                next(stream)
            t = time.perf_counter()
            for _ in range(batches):
                next(stream)
            times.append((time.perf_counter() - t) * 1000 / (batches * batch_size))
    rows, previous = [], 0.0
    for name, _, times in loaders:
        ms = summarize(times)
        rows.append({"stage": name, "ms_per_clip": ms["median"], "ms_min": ms["min"], "ms_max": ms["max"],
                     "stage_ms": ms["median"] - previous})
        previous = ms["median"]
        print(f"[bench] profile {name:<66} {ms['median']:6.1f} ms/clip/core", flush=True)
    return rows


def epoch_boundary(shards: str, epochs: int = 4, batch_size: int = 8, threads: int = 1) -> dict:
    """Seconds the first batch of an epoch waits beyond a steady batch: the new epoch's pipeline
    (built per epoch, seeded by epoch) filling its prefetch queue."""
    cfg = load_config(DEFAULT_CONFIG, [f"data.shards={shards}", f"data.batch_size={batch_size}",
                                       f"data.threads={threads}", "data.device=cpu"]).data
    loader = build_loader(cfg, backend="dali")
    first, steady = [], []
    for epoch in range(epochs):
        t = time.perf_counter()
        for i, _ in enumerate(loader):
            now = time.perf_counter()
            (first if i == 0 else steady).append(now - t)
            t = now
    boundary = [f - statistics.median(steady) for f in first[1:]]  # the first epoch also builds the graph
    return {"boundary_s": statistics.median(boundary), "boundary_s_max": max(boundary),
            "steady_batch_s": statistics.median(steady), "batches_per_epoch": len(loader), "epochs": epochs}


# Where the CPU time of a hybrid loader goes (CPU decode, GPU augmentation): each row adds one
# part of its CPU side to the row above. The first row reads the sample's bytes the way the
# reader does, in Python with no DALI, as the floor: the reader row's excess is DALI's own
# per-sample cost (scheduling, buffers, the shuffle). Then the nvdec mode's CPU side, its own
# chain: the draw pipeline with the clips' jobs, then the demuxing its NVDEC sessions do on the
# CPU. The rows of the hybrid and nvdec loaders need a GPU.
CPU_SIDE_STAGES = [
    ("file reads alone (Python, no DALI)", None),
    ("reader (webdataset, shuffled)", {}),
    ("+ video decode (30 frames)", {"video": True}),
    ("+ audio decode and window", {"video": True, "audio": True}),
    ("+ host-to-device copies", {"video": True, "audio": True, "to_gpu": True}),
    ("the hybrid loader (GPU augmentation and spectrogram, hand-off to torch)", "hybrid"),
    ("the CPU graph alone (two views, spectrogram; outputs dropped)", "cpu graph"),
    ("the CPU loader (the same, handed to torch)", "cpu"),
    ("nvdec mode: draw pipeline and clip jobs (reader, start, audio window, segment bytes)", "nvdec draw"),
    ("+ demuxing each segment (spdl-io, the NVDEC sessions' CPU part)", "nvdec demux"),
    ("the nvdec loader (sessions, GPU augmentation, hand-off to torch)", "nvdec"),
]
CHAINS = {"nvdec draw": "nvdec", "nvdec demux": "nvdec"}  # stages after the first of their chain add to it


def _nvdec_cpu_step(cfg, opts, tars, idxs, threads: int, demux: bool):
    """One batch of the nvdec mode's CPU work without a GPU: the draw pipeline, each clip's job
    (its segments' bytes, as pipelines/nvdec.py cuts them) and, with demux, spdl-io's demuxing of
    each segment, which an NVDEC session does before the engine decodes."""
    from stica.pipelines.nvdec import draw_pipeline
    from stica.shards import clip_segments, parse_info

    p = draw_pipeline(tars, idxs, cfg, opts["seg_frames"], opts["fps"], 0, 1, cfg.seed, batch_size=cfg.batch_size,
                      num_threads=threads, device_id=None, prefetch_queue_depth=cfg.prefetch, exec_dynamic=True,
                      seed=cfg.seed)
    p.build()

    def step():
        import spdl.io

        segs, info, start, _, _ = ([np.asarray(t) for t in out] for out in p.run())
        for i in range(len(info)):
            meta, offsets = parse_info(info[i])
            for segment, _, _ in clip_segments(segs[i], meta, offsets, int(start[i]), cfg.num_frames):
                if demux:
                    spdl.io.demux_video(segment)

    return step


def _stage_pipeline(cfg, opts, tars, idxs, threads: int, video=False, audio=False, to_gpu=False):
    """The first parts of the pretraining graph alone (pipelines/pretrain.py), started at a random
    clip as it is; its outputs are dropped."""
    from nvidia.dali import pipeline_def

    from stica.pipelines.clips import audio_clip, decode_clip
    from stica.pipelines.pretrain import draw

    @pipeline_def(batch_size=cfg.batch_size, num_threads=threads, device_id=0 if to_gpu else None,
                  prefetch_queue_depth=cfg.prefetch, exec_dynamic=True, seed=cfg.seed)
    def pipe():
        segs, flac, info, _, start = draw(tars, idxs, cfg, 0, 1, cfg.seed)
        T, fps = cfg.num_frames, opts["fps"]
        outs = [segs, flac, info]
        if video:
            outs[0] = decode_clip(segs, info, start, T, opts["seg_frames"], "cpu")
        if audio:
            outs[1] = audio_clip(flac, info, start, fps, T / fps, cfg.audio.rate, opts["seg_frames"])
        if to_gpu:
            outs[:2] = [o.gpu() for o in outs[:2]]
        return tuple(outs)

    p = pipe()
    p.build()
    return p


def _pretrain_graph(cfg, opts, tars, idxs, threads: int):
    from stica.pipelines.pretrain import pretrain_pipeline

    p = pretrain_pipeline(tars, idxs, cfg, opts["seg_frames"], opts["fps"], 0, 1, "cpu", cfg.seed,
                          batch_size=cfg.batch_size, num_threads=threads, device_id=None,
                          prefetch_queue_depth=cfg.prefetch, exec_dynamic=True, seed=cfg.seed)
    p.build()
    return p


def _read_members(tars, idxs, count: int):
    """The bytes of `count` samples' members, read as the reader does (seek, read), in Python."""
    from stica.shards import read_index

    done = 0
    for tar, idx in zip(tars, idxs):
        with open(tar, "rb") as f:
            for _, members in read_index(idx):
                for offset, size in members.values():
                    f.seek(offset)
                    f.read(size)
                done += 1
                if done == count:
                    return


def cpu_side(shards: str, batch_size: int = 8, threads: int = 2, batches: int = 6, repeats: int = 3) -> list[dict]:
    """CPU ms per clip of each part of the hybrid loader's CPU side, and of the whole CPU and
    hybrid loaders: the process's CPU time (every DALI thread and the main one) over `batches`
    steady batches, divided by the clips. CPU time rather than wall time: it is what a core
    spends whatever the thread count. Each row reads its fastest repeat: on a shared machine
    another process's load still adds to it (caches, memory bandwidth), never takes away.
    Rows that need a GPU say so where there is none."""
    from stica.shards import load_manifest, shard_paths

    cfg = load_config(DEFAULT_CONFIG, [f"data.shards={shards}", f"data.batch_size={batch_size}",
                                       f"data.threads={threads}"]).data
    opts = load_manifest(shards)["options"]
    tars, idxs = shard_paths(shards, "train")
    gpu = torch.cuda.is_available()
    samples = {name: [] for name, _ in CPU_SIDE_STAGES}
    for _ in range(repeats):  # whole passes, one stage at a time: CPU time is process-wide
        for name, stage in CPU_SIDE_STAGES:
            needs_gpu = stage in ("hybrid", "nvdec") or (isinstance(stage, dict) and stage.get("to_gpu"))
            if needs_gpu and not gpu:
                continue
            if stage is None:
                clips = batches * batch_size
                t = time.process_time()
                _read_members(tars, idxs, clips)
                samples[name].append((time.process_time() - t) * 1000 / clips)
                continue
            if isinstance(stage, dict):
                step = _stage_pipeline(cfg, opts, tars, idxs, threads, **stage).run
            elif stage == "cpu graph":
                step = _pretrain_graph(cfg, opts, tars, idxs, threads).run
            elif isinstance(stage, str) and stage in CHAINS:
                step = _nvdec_cpu_step(cfg, opts, tars, idxs, threads, demux=stage == "nvdec demux")
            else:
                step = functools.partial(next, _forever(build_loader(load_config(
                    DEFAULT_CONFIG, [f"data.shards={shards}", f"data.batch_size={batch_size}",
                                     f"data.threads={threads}", f"data.device={stage}"]).data)))
            for _ in range(cfg.prefetch + 1):  # warm-up: pools filled, the prefetch queue full
                step()
            t = time.process_time()
            for _ in range(batches):
                step()
            sync()
            samples[name].append((time.process_time() - t) * 1000 / (batches * batch_size))
            del step  # the pipeline goes before the next stage is timed
    rows, previous = [], {}
    for name, stage in CPU_SIDE_STAGES:
        if not samples[name]:
            rows.append({"stage": name, "cpu_ms_per_clip": None, "ms_min": None, "ms_max": None, "stage_ms": None,
                         "note": "needs a CUDA GPU"})
            continue
        ms = summarize(samples[name])
        chain = "hybrid" if stage is None or isinstance(stage, dict) else CHAINS.get(stage)
        rows.append({"stage": name, "cpu_ms_per_clip": ms["min"], "ms_min": ms["min"], "ms_max": ms["max"],
                     "stage_ms": ms["min"] - previous[chain] if chain in previous else None, "note": ""})
        if chain:
            previous[chain] = ms["min"]
        print(f"[bench] cpu side {name:<72} {ms['min']:6.2f} CPU ms/clip (fastest of {ms['n']})", flush=True)
    return rows
