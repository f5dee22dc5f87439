"""Decoding the members of a packed sample (see stica/shards.py) with PyAV: the packer checks
what it wrote with these, and the reference loader reads shards with them."""
from __future__ import annotations

import io

import av
import numpy as np


def iter_frames(segment: bytes):
    """The video frames of one packed segment, decoded on one thread."""
    with av.open(io.BytesIO(segment)) as c:
        c.streams.video[0].thread_count = 1  # the callers parallelise across segments
        yield from c.decode(video=0)


def decode_segment(segment: bytes) -> list[np.ndarray]:
    """RGB frames (H,W,3 uint8) of one packed segment."""
    return [f.to_ndarray(format="rgb24") for f in iter_frames(segment)]


def decode_flac(flac: bytes) -> np.ndarray:
    """The packed mono audio track as int16 samples."""
    with av.open(io.BytesIO(flac)) as c:
        return np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])


def decode_audio_file(path, rate: int) -> np.ndarray:
    """Any audio (or video) file's first audio stream as mono float32 at `rate`, on the int16
    scale the packed FLAC tracks have (so spectrograms match the training ones)."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    with av.open(str(path)) as c:
        if not c.streams.audio:
            raise ValueError(f"{path}: no audio stream")
        chunks = [f.to_ndarray().reshape(-1) for frame in c.decode(audio=0) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32)
