"""`stica-shard verify DIR`: re-read every shard as training will, and list what is wrong."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stica.shards import load_manifest, parse_info, split_audio, split_segments
from stica.tools.display import output_size, probe_file


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


def _decoded(decoder, pieces: list[bytes]) -> tuple[int, set[tuple]]:
    """Frames (video) or samples (audio) DALI decodes from these segments, in all, and the
    shapes of one frame (video: height, width) it decoded."""
    total, shapes = 0, set()
    for i in range(0, len(pieces), decoder.max_batch_size):
        decoder.feed_input("seg", [np.frombuffer(s, np.uint8) for s in pieces[i:i + decoder.max_batch_size]])
        (out,) = decoder.run()
        total += sum(shape[0] for shape in out.shape())  # shape() works on CPU and GPU outputs alike
        shapes |= {tuple(shape[1:3]) for shape in out.shape()}
    return total, shapes


def verify(root: str | Path, device: str = "cpu", sources: str | Path | None = None) -> list[str]:
    """Checksums against the manifest, every sample read by DALI's webdataset reader, every
    video and audio segment decoded by DALI, frame and sample counts and the frame size against
    KEY.info; with `sources`, each sample's size against what a player shows of its source."""
    root = Path(root)
    manifest = load_manifest(root)
    by_name = {}
    if sources is not None:
        for path in sorted(Path(sources).rglob("*")):
            by_name.setdefault(path.name, path)
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
            problems += _check_samples(tar, idx, shard["samples"], *decoders, by_name, manifest["options"]["short_side"])
        except Exception as e:  # DALI raises on a broken member and takes the batch with it
            problems.append(f"{tar}: unreadable by DALI ({str(e).strip().splitlines()[0][:300]})")
    return problems


def _check_samples(tar: Path, idx: Path, expected: int, video, audio, sources: dict[str, Path],
                   short_side: int) -> list[str]:
    reader, count = _dali_reader(str(tar), str(idx))
    problems = [] if count == expected else [f"{tar}: {count} samples, manifest says {expected}"]
    for _ in range(count):
        segs, flac, info, meta_raw = (np.asarray(o.at(0)) for o in reader.run())
        record = json.loads(bytes(meta_raw))
        key = record["key"]
        meta, _ = parse_info(info)
        samples, _ = _decoded(audio, split_audio(flac.tobytes(), info))
        if samples != meta["audio_samples"]:
            problems.append(f"{tar}:{key}: audio has {samples} samples, info says {meta['audio_samples']}")
        frames, shapes = _decoded(video, split_segments(segs.tobytes(), info))
        if frames != meta["num_frames"]:
            problems.append(f"{tar}:{key}: decodes to {frames} frames, info says {meta['num_frames']}")
        if shapes - {(meta["height"], meta["width"])}:
            problems.append(f"{tar}:{key}: decodes to frames of {sorted(shapes)} (height, width), info says "
                            f"{meta['height']}x{meta['width']}")
        source = sources.get(record["source"])
        if source is not None:
            problems += _check_display(f"{tar}:{key}", source, meta, short_side)
    return problems


def _check_display(where: str, source: Path, meta: dict, short_side: int) -> list[str]:
    """The packed size against the shown size of the source, as a player shows it today."""
    try:
        display = probe_file(source)
    except Exception as e:
        return [f"{where}: source {source} does not open ({e})"]
    want = output_size(display, short_side)
    if want != (meta["width"], meta["height"]):
        return [f"{where}: packed {meta['width']}x{meta['height']}, but {source} shows as {want[0]}x{want[1]} "
                f"(rotation {display.rotation}, pixel aspect {display.sar}); pack it again"]
    return []
