"""The shard contract (format v2): what `stica-shard` writes and every reader relies on.

A sample KEY in a GNU tar shard has these members:

  KEY.segs  the video as independent segments of `seg_frames` frames, each a complete
            WebM/VP9 (or MP4/H.264) file, stored back to back. DALI 2.4's CPU decoder
            does not seek, so decoding a clip at frame 270 of one long stream costs about
            5x a clip at frame 0 (research/dali.md); with segments a reader decodes only
            the one or two segments a clip touches, whatever its start.
  KEY.flac  mono audio at `audio_rate`, sample 0 at video frame 0, same duration as the
            video (silence with has_audio=0 when packed with --allow-no-audio), as one
            complete FLAC file per video segment, back to back: segment k holds samples
            [k P, (k + 1) P), P = seg_frames * audio_rate // fps, the last one the rest.
            DALI 2.4's audio decoder cannot start at an offset, and decoding a 10-s track
            whole to cut the second a clip needs cost 5-9 ms of CPU a clip (format v1).
  KEY.info  int32 vector read in-graph by DALI (layout: INFO_FIELDS, then the
            num_segments + 1 byte offsets of the video segments inside KEY.segs, then
            the num_segments + 1 byte offsets of the audio segments inside KEY.flac).
  KEY.json  metadata for people and Python readers.
  KEY.cls   label index as text (the webdataset convention).

Beside the shards: `{split}-NNNNNN.tar` + `.idx` (DALI's wds2idx format), `manifest.json`,
`failures.jsonl`, `classes.txt`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# v3 (2026-12-07) packs the picture a player shows: upright, square pixels, limited-range BT.601,
# 8-bit, with what was applied in KEY.json (docs/packing.md). Its members are laid out as v2's, so
# v2 shards still read; only sources with rotation, non-square pixels, full range, a BT.709 or
# BT.2020 matrix or more than 8 bits need packing again.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
MEMBERS = ("segs", "flac", "info", "json", "cls")
INFO_FIELDS = (
    "version", "num_frames", "fps", "width", "height", "has_audio", "label_index",
    "audio_rate", "audio_samples", "seg_frames", "num_segments",
)
INFO = {name: i for i, name in enumerate(INFO_FIELDS)}
# Index of the first segment offset inside KEY.info; segment k spans [off[k], off[k+1]).
INFO_OFFSETS = len(INFO_FIELDS)


def pack_info(meta: dict, offsets: list[int], audio_offsets: list[int]) -> bytes:
    values = [meta[name] for name in INFO_FIELDS] + list(offsets) + list(audio_offsets)
    return np.asarray(values, dtype="<i4").tobytes()


def _info_array(raw: bytes | np.ndarray) -> np.ndarray:
    return np.frombuffer(raw, dtype="<i4") if isinstance(raw, (bytes, bytearray)) else np.asarray(raw)


def parse_info(raw: bytes | np.ndarray) -> tuple[dict, np.ndarray]:
    arr = _info_array(raw)
    meta = {name: int(arr[i]) for i, name in enumerate(INFO_FIELDS)}
    if meta["version"] not in READABLE_VERSIONS:
        raise ValueError(f"shard format v{meta['version']} is not supported (this reader reads "
                         f"v{', v'.join(map(str, READABLE_VERSIONS))}; repack with this version's stica-shard)")
    return meta, arr[INFO_OFFSETS:INFO_OFFSETS + meta["num_segments"] + 1]


def read_members(f, members: dict, exts=("segs", "flac", "info")) -> dict[str, bytes]:
    """A sample's members, by its index line's (offset, size), from its open shard."""
    out = {}
    for ext in exts:
        f.seek(members[ext][0])
        out[ext] = f.read(members[ext][1])
    return out


def clip_pieces(start: int, num_frames: int, seg_frames: int, total_frames: int) -> list[tuple[int, int, int]]:
    """(segment k, first frame in it, frames) for the clip [start, start + num_frames): the
    frames past the video's end are the caller's to edge-pad, as DALI's decoder does."""
    pieces, frame = [], start
    while frame < min(start + num_frames, total_frames):
        k, first = divmod(frame, seg_frames)
        count = min(seg_frames - first, start + num_frames - frame, total_frames - frame)
        pieces.append((k, first, count))
        frame += count
    return pieces


def clip_segments(segs, meta: dict, offsets, start: int, num_frames: int) -> list[tuple[bytes, int, int]]:
    """clip_pieces with each piece's segment cut out of the video member (bytes or a uint8
    array) at KEY.info's offsets (parse_info's): (segment bytes, first frame in it, frames)."""
    return [(bytes(segs[offsets[k]:offsets[k + 1]]), first, count)
            for k, first, count in clip_pieces(start, num_frames, meta["seg_frames"], meta["num_frames"])]


def audio_segment_samples(seg_frames: int, rate: int, fps: int) -> int:
    """P: the samples at `rate` of every audio segment but the last."""
    return seg_frames * rate // fps


def split_segments(segs: bytes, info: bytes | np.ndarray) -> list[bytes]:
    _, offsets = parse_info(info)
    return [segs[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def split_audio(flac: bytes, info: bytes | np.ndarray) -> list[bytes]:
    """The audio segments of KEY.flac, one complete FLAC file each."""
    meta, _ = parse_info(info)
    start = INFO_OFFSETS + meta["num_segments"] + 1
    offsets = _info_array(info)[start:start + meta["num_segments"] + 1]
    return [flac[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def part_tag(part: tuple[int, int] | None) -> str:
    """'' for a job packed on one machine; '-p003' for part 3 of a job packed on several."""
    return "" if part is None else f"-p{part[0]:03d}"


def shard_name(split: str, index: int, part: tuple[int, int] | None = None) -> str:
    """`train-000012.tar`; a part I of N of a job packed on several machines: `train-p003-000012.tar`."""
    return f"{split}{part_tag(part)}-{index:06d}.tar"


def load_manifest(root: str | Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; is this a stica-shard output directory?")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: format v{manifest.get('format_version')} is not one of "
                         f"v{', v'.join(map(str, READABLE_VERSIONS))}; repack with this version's stica-shard "
                         "(v2 packs the audio in segments, as the video)")
    return manifest


def shard_paths(root: str | Path, split: str) -> tuple[list[str], list[str]]:
    """Tar paths and their DALI index paths for one split, in manifest order; `a+b` reads the
    splits a and b as one (e.g. a training list and its held-out part)."""
    root = Path(root)
    splits = load_manifest(root)["splits"]
    unknown = [name for name in split.split("+") if name not in splits]
    if unknown:
        raise KeyError(f"{root}: no split {', '.join(unknown)} in manifest.json (splits: {', '.join(sorted(splits))})")
    shards = [s for name in split.split("+") for s in splits[name]["shards"]]
    tars = [str(root / s["name"]) for s in shards]
    return tars, [t[:-len(".tar")] + ".idx" for t in tars]


def read_index(idx_path: str | Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """A DALI wds2idx index: per sample, its key and {ext: (offset, size)} inside the tar."""
    lines = Path(idx_path).read_text().splitlines()
    samples = []
    for line in lines[1:]:
        f = line.split()
        members = {f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)}
        samples.append((f[3].split(".", 1)[0], members))
    return samples
