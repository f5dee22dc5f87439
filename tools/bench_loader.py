"""Loader measurements for stica-bench: clips/s delivered, and what a clip costs by its start."""
from __future__ import annotations

import os
import statistics
import time

from stica.config import load_config
from stica.media import torchcodec_missing
from stica.pipelines.loader import build_loader
from stica.tools.measure import DEFAULT_CONFIG, summarize, sync


def loader_throughput(shards: str, backend: str, parallel: int, batch_size: int = 8, batches: int | None = 10,
                      repeats: int = 3, warmup: int = 2, overrides: list[str] = (), config: str = DEFAULT_CONFIG) -> dict:
    """Clips/s (two views + spectrogram) after warm-up; `parallel` is DALI threads or DataLoader
    workers. batches=None times whole epochs, boundaries included, after one warm-up epoch."""
    cfg = load_config(config, [f"data.shards={shards}", f"data.batch_size={batch_size}",
                               f"data.threads={parallel}", *overrides]).data
    loader = build_loader(cfg, backend=backend, workers=parallel)
    if batches is None:
        batches = warmup = len(loader)
    rates = []
    stream = _forever(loader)
    for _ in range(warmup):
        next(stream)
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        for _ in range(batches):
            next(stream)
        sync()  # GPU outputs are only ready once the device has finished them
        rates.append(batches * batch_size / (time.perf_counter() - t))
    return {"backend": backend, "parallel": parallel, "batch_size": batch_size, "clips_per_s": summarize(rates),
            "device": getattr(loader, "device", "cpu")}


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
            segs, _, info, _ = read_shards(tars, idxs, 0, 1, shuffle=False, shuffle_buffer=1)
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


def run_loader(shards: str, p: dict, backends: list[str]) -> list[dict]:
    """Whole epochs of each loader, one row per backend and thread/worker count (DALI also per
    prefetch depth): epoch boundaries count, as in training. A backend that cannot run here
    (torchcodec without FFmpeg's libraries) gets one row saying why instead."""
    rows = []
    cores = os.cpu_count() or 1
    for backend in backends:
        if backend == "torchcodec" and (why := torchcodec_missing()):
            rows.append({"backend": backend, "decode": "-", "threads_or_workers": "-", "prefetch": "-",
                         "clips_per_s": None, "clips_per_s_min": None, "clips_per_s_max": None,
                         "clips_per_s_per_core": None, "note": f"not measured: {why}"})
            print(f"[bench] loader torchcodec not measured: {why}", flush=True)
            continue
        # DataLoader workers keep their own fixed prefetch (2 batches each).
        for prefetch in p["prefetch"] if backend == "dali" else ["-"]:
            for parallel in p["parallel"]:
                extra = [f"data.prefetch={prefetch}"] if backend == "dali" else []
                r = loader_throughput(shards, backend, parallel, batch_size=p["loader_batch"], batches=None,
                                      repeats=p["loader_epochs"], overrides=extra)
                rate = r["clips_per_s"]
                rows.append({"backend": backend, "decode": r["device"], "threads_or_workers": parallel,
                             "prefetch": prefetch, "clips_per_s": rate["median"], "clips_per_s_min": rate["min"],
                             "clips_per_s_max": rate["max"], "clips_per_s_per_core": rate["median"] / min(parallel, cores),
                             "note": ""})
                print(f"[bench] loader {backend:>10} ({r['device']}) x{parallel} prefetch {prefetch}: "
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
