"""`stica-shard verify DIR`: re-read every shard as training will, and list what is wrong."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stica.shards import load_manifest, parse_info, split_audio, split_segments


def _dali_reader(tar: str, idx: str):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        return tuple(fn.readers.webdataset(
            paths=[tar], index_paths=[idx], ext=["segs", "flac", "info", "json"],
            dtypes=[types.UINT8, types.UINT8, types.INT32, types.UINT8],
            missing_component_behavior="error", name="reader"))

    p = pipe()
    p.build()
    return p, p.reader_meta("reader")["epoch_size"]


def _dali_segment_decoder(batch: int, device: str, kind: str = "video"):
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=batch, num_threads=2, device_id=0 if device == "mixed" and kind == "video" else None,
                 prefetch_queue_depth=1, exec_dynamic=True)
    def pipe():
        if kind == "audio":
            return fn.decoders.audio(fn.external_source(name="seg"), downmix=True)[0]
        return fn.decoders.video(fn.external_source(name="seg"), device=device)

    p = pipe()
    p.build()
    return p


def _decoded_lengths(decoder, pieces: list[bytes]) -> int:
    """Frames (video) or samples (audio) DALI decodes from these segments, in all."""
    total = 0
    for i in range(0, len(pieces), decoder.max_batch_size):
        decoder.feed_input("seg", [np.frombuffer(s, np.uint8) for s in pieces[i:i + decoder.max_batch_size]])
        (out,) = decoder.run()
        total += sum(shape[0] for shape in out.shape())  # shape() works on CPU and GPU outputs alike
    return total


def verify(root: str | Path, device: str = "cpu") -> list[str]:
    """Checksums against the manifest, every sample read by DALI's webdataset reader, every
    video and audio segment decoded by DALI, frame and sample counts against KEY.info."""
    root = Path(root)
    manifest = load_manifest(root)
    problems = []
    shards = [(split, s) for split, info in manifest["splits"].items() for s in info["shards"]]
    decoders = _dali_segment_decoder(batch=16, device=device), _dali_segment_decoder(batch=16, device="cpu", kind="audio")
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
            problems += _check_samples(tar, idx, shard["samples"], *decoders)
        except Exception as e:  # DALI raises on a broken member and takes the batch with it
            problems.append(f"{tar}: unreadable by DALI ({str(e).strip().splitlines()[0][:300]})")
    return problems


def _check_samples(tar: Path, idx: Path, expected: int, video, audio) -> list[str]:
    reader, count = _dali_reader(str(tar), str(idx))
    problems = [] if count == expected else [f"{tar}: {count} samples, manifest says {expected}"]
    for _ in range(count):
        segs, flac, info, meta_raw = (np.asarray(o.at(0)) for o in reader.run())
        key = json.loads(bytes(meta_raw))["key"]
        meta, _ = parse_info(info)
        samples = _decoded_lengths(audio, split_audio(flac.tobytes(), info))
        if samples != meta["audio_samples"]:
            problems.append(f"{tar}:{key}: audio has {samples} samples, info says {meta['audio_samples']}")
        frames = _decoded_lengths(video, split_segments(segs.tobytes(), info))
        if frames != meta["num_frames"]:
            problems.append(f"{tar}:{key}: decodes to {frames} frames, info says {meta['num_frames']}")
    return problems
