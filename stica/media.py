"""Decoding the members of a packed sample (see stica/shards.py) with PyAV: the packer checks
what it wrote with these, and the reference loader reads shards with them. torchcodec (an
optional extra, FFmpeg's shared libraries needed) does the same for the torchcodec loader, the
peer users pick today; spdl-io (Meta's SPDL, also optional) does it for the spdl loader."""
from __future__ import annotations

import importlib
import io
import itertools

import av
import numpy as np

from stica.shards import split_audio


def iter_frames(segment: bytes):
    """The video frames of one packed segment, decoded on one thread."""
    with av.open(io.BytesIO(segment)) as c:
        c.streams.video[0].thread_count = 1  # the callers parallelise across segments
        yield from c.decode(video=0)


def decode_segment(segment: bytes) -> list[np.ndarray]:
    """RGB frames (H,W,3 uint8) of one packed segment."""
    return [f.to_ndarray(format="rgb24") for f in iter_frames(segment)]


def segment_frames(segment: bytes, start: int, stop: int, decoder: str = "pyav") -> np.ndarray:
    """Frames [start, stop) of one packed segment (fewer where it ends first) as T,H,W,3 uint8
    RGB, on one thread; decoding stops at `stop`, as DALI's decoder does."""
    if decoder == "torchcodec":
        from torchcodec.decoders import VideoDecoder

        video = VideoDecoder(segment, dimension_order="NHWC", num_ffmpeg_threads=1)
        return video.get_frames_in_range(start, min(stop, len(video))).data.numpy()
    if decoder == "spdl":
        import spdl.io

        frames = spdl.io.decode_packets(spdl.io.demux_video(segment), num_frames=stop,
                                        filter_desc=spdl.io.get_video_filter_desc(pix_fmt="rgb24"),
                                        decode_config=spdl.io.decode_config(decoder_options={"threads": "1"}))
        return spdl.io.to_numpy(spdl.io.convert_frames(frames))[start:stop]
    return np.stack([f.to_ndarray(format="rgb24") for f in itertools.islice(iter_frames(segment), start, stop)])


def decode_flac(flac: bytes, decoder: str = "pyav") -> np.ndarray:
    """The packed mono audio track as int16 samples."""
    if decoder == "spdl":
        import spdl.io

        frames = spdl.io.decode_packets(spdl.io.demux_audio(flac),
                                        filter_desc=spdl.io.get_audio_filter_desc(sample_fmt="s16"))
        return spdl.io.to_numpy(spdl.io.convert_frames(frames)).reshape(-1)
    if decoder == "torchcodec":
        from torchcodec.decoders import AudioDecoder

        # FFmpeg hands FLAC's int16 samples over as float / 32768: scaling back is exact.
        return (AudioDecoder(flac).get_all_samples().data[0] * 32768).round().numpy().astype(np.int16)
    with av.open(io.BytesIO(flac)) as c:
        return np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])


def decode_track(flac: bytes, info: bytes, decoder: str = "pyav") -> np.ndarray:
    """A packed sample's whole audio track (int16), its segments decoded one after another."""
    return np.concatenate([decode_flac(piece, decoder) for piece in split_audio(flac, info)])


def decoder_missing(decoder: str) -> str | None:
    """Why an optional decoder (torchcodec, spdl) cannot run here (None where it can)."""
    try:
        if decoder == "spdl":
            importlib.import_module("spdl.io").demux_config()  # loads FFmpeg's libraries
        else:
            importlib.import_module("torchcodec.decoders")  # loads FFmpeg's libraries
    except Exception as e:  # ImportError without the package, RuntimeError/OSError without FFmpeg
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"
    return None


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
