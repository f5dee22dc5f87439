"""`stica-shard verify DIR`: re-read every shard as training will, and list what is wrong."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stica.shards import load_manifest, parse_info, split_segments


def _dali_reader(tar: str, idx: str):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        segs, flac, info, meta = fn.readers.webdataset(
            paths=[tar], index_paths=[idx], ext=["segs", "flac", "info", "json"],
            dtypes=[types.UINT8, types.UINT8, types.INT32, types.UINT8],
            missing_component_behavior="error", name="reader")
        audio, _ = fn.decoders.audio(flac, downmix=True)
        return segs, info, meta, audio.shape()

    p = pipe()
    p.build()
    return p, p.reader_meta("reader")["epoch_size"]


def _dali_segment_decoder(batch: int, device: str):
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=batch, num_threads=2, device_id=0 if device == "mixed" else None,
                 prefetch_queue_depth=1, exec_dynamic=True)
    def pipe():
        return fn.decoders.video(fn.external_source(name="seg"), device=device)

    p = pipe()
    p.build()
    return p


def verify(root: str | Path, device: str = "cpu") -> list[str]:
    """Checksums against the manifest, every sample read by DALI's webdataset reader, every
    segment and audio track decoded by DALI, frame and sample counts against KEY.info."""
    root = Path(root)
    manifest = load_manifest(root)
    problems = []
    shards = [(split, s) for split, info in manifest["splits"].items() for s in info["shards"]]
    decoder = _dali_segment_decoder(batch=16, device=device)
    for split, shard in tqdm(shards, unit="shard", desc="verify"):
        tar = root / shard["name"]
        idx = tar.with_suffix(".idx")
        if not tar.exists() or not idx.exists():
            problems.append(f"{tar}: missing {'tar' if not tar.exists() else 'index'}")
            continue
        with open(tar, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != shard["sha256"]:
                problems.append(f"{tar}: sha256 differs from manifest.json (file changed or corrupt)")
        try:
            problems += _check_samples(tar, idx, shard["samples"], decoder)
        except Exception as e:  # DALI raises on a broken member and takes the batch with it
            problems.append(f"{tar}: unreadable by DALI ({str(e).strip().splitlines()[0][:300]})")
    return problems


def _check_samples(tar: Path, idx: Path, expected: int, decoder) -> list[str]:
    reader, count = _dali_reader(str(tar), str(idx))
    problems = [] if count == expected else [f"{tar}: {count} samples, manifest says {expected}"]
    for _ in range(count):
        segs, info, meta_raw, audio_shape = (o.at(0) for o in reader.run())
        key = json.loads(bytes(np.asarray(meta_raw)))["key"]
        meta, _ = parse_info(np.asarray(info))
        if int(np.asarray(audio_shape)[0]) != meta["audio_samples"]:
            problems.append(f"{tar}:{key}: audio has {int(np.asarray(audio_shape)[0])} samples, "
                            f"info says {meta['audio_samples']}")
        segments = split_segments(np.asarray(segs).tobytes(), np.asarray(info))
        frames = 0
        for i in range(0, len(segments), decoder.max_batch_size):
            batch = [np.frombuffer(s, np.uint8) for s in segments[i:i + decoder.max_batch_size]]
            decoder.feed_input("seg", batch)
            (out,) = decoder.run()
            frames += sum(shape[0] for shape in out.shape())  # shape() works on CPU and GPU outputs alike
        if frames != meta["num_frames"]:
            problems.append(f"{tar}:{key}: decodes to {frames} frames, info says {meta['num_frames']}")
    return problems
