"""DALI graph pieces shared by the pretraining and evaluation pipelines: reading shards,
decoding a clip out of the segmented video member, its aligned audio window out of the
segmented audio member, and its log-mel spectrogram.
"""
from __future__ import annotations

import math

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from stica.shards import INFO, INFO_OFFSETS, audio_segment_samples

KEY_BYTES = 1024  # source_info ("path:offset:KEY.segs") padded to a fixed size, so batches stack


def read_shards(tars, idxs, shard_id, num_shards, shuffle: bool, shuffle_buffer: int, seed: int):
    """Every rank sees the same number of samples (pad_last_batch) so DDP ranks stay in step.
    The seed is explicit: DALI seeds an operator left unseeded by its place in the graph, and
    graphs that must draw the same order (the training graph, the nvdec mode's, the replay that
    finds a damaged sample) differ in what follows the reader."""
    segs, flac, info = fn.readers.webdataset(
        paths=tars, index_paths=idxs, ext=["segs", "flac", "info"],
        dtypes=[types.UINT8, types.UINT8, types.INT32], missing_component_behavior="error",
        shard_id=shard_id, num_shards=num_shards, random_shuffle=shuffle, initial_fill=shuffle_buffer,
        pad_last_batch=True, seed=seed, name="reader")
    key = fn.pad(fn.get_property(segs, key="source_info"), axes=[0], shape=[KEY_BYTES])
    return segs, flac, info, key


def clip_start(info, num_frames: int, seed: int):
    """Each video's clip start, uniform over the frames where a whole clip fits; videos shorter
    than a clip start at 0 (edge-padded). Seeded explicitly, as the reader."""
    span = fn.cast(field(info, "num_frames") - num_frames + 1, dtype=types.FLOAT)
    start = fn.cast(fn.random.uniform(range=[0.0, 1.0], seed=seed) * span, dtype=types.INT32)
    return start * fn.cast(span > 0, dtype=types.INT32)


def parse_source_info(raw) -> tuple[str, int, str]:
    """read_shards' key output (zero-padded bytes of 'path/shard.tar:offset:KEY.segs') ->
    (tar path, offset of the video member in it, KEY)."""
    text = bytes(np.asarray(raw, dtype=np.uint8)).rstrip(b"\0").decode()
    path, offset, name = text.rsplit(":", 2)
    return path, int(offset), name.split(".", 1)[0]


def output_dtype(cfg, mode: str):
    """fp16 clips only on the GPU paths, where the model consumes them under autocast."""
    return types.FLOAT16 if (cfg.fp16 and mode != "cpu") else types.FLOAT


def to_augment_device(data, mode: str):
    """cpu: everything on the CPU; hybrid: CPU decode, GPU augmentation; mixed: NVDEC decode."""
    return data if mode == "cpu" or data.device == "gpu" else data.gpu()


def field(info, name):
    return info[INFO[name]]


def _scalar(value: int):
    return fn.reshape(fn.constant(idata=[value], dtype=types.INT32), shape=[])


def decode_clip(segs, info, start, num_frames: int, seg_frames: int, mode: str):
    """Frames [start, start + num_frames) as FHWC uint8, decoding only the segments they touch,
    on NVDEC (mode mixed) or the CPU (cpu, hybrid); on the GPU unless mode is cpu.

    A clip of T frames touches at most ceil((T - 1) / S) + 1 segments of S frames, so the graph
    has that many decoder calls. Call i decodes segment a + i (a = start // S) from frame r =
    start % S for i = 0, else from 0, for the frames still missing (at least 1: the decoder
    wants a positive length; the surplus is sliced off). The last segment is read with edge
    padding so clips longer than the video repeat its last frame, as the reference code does.
    """
    calls = math.ceil((num_frames - 1) / seg_frames) + 1
    total, nseg = field(info, "num_frames"), field(info, "num_segments")
    first = start // seg_frames
    pieces, done = [], _scalar(0)
    for i in range(calls):
        k = dmath.min(first + i, nseg - 1)
        seg_len = dmath.min(_scalar(seg_frames), total - k * seg_frames)
        offset = start - first * seg_frames if i == 0 else _scalar(0)
        offset = dmath.min(offset, seg_len - 1)
        is_last = k == nseg - 1
        want = dmath.max(_scalar(num_frames) - done, _scalar(1))
        # Past the last segment we ask for the full remainder (edge-padded by the decoder).
        length = fn.cast(is_last, dtype=types.INT32) * want + \
            (1 - fn.cast(is_last, dtype=types.INT32)) * dmath.min(want, seg_len - offset)
        data = fn.slice(segs, fn.reshape(info[INFO_OFFSETS + k], shape=[1]),
                        fn.reshape(info[INFO_OFFSETS + k + 1] - info[INFO_OFFSETS + k], shape=[1]), axes=[0])
        pieces.append(fn.decoders.video(data, device="mixed" if mode == "mixed" else "cpu", start_frame=offset,
                                        sequence_length=length, pad_mode="edge"))
        done = done + length
    clip = fn.cat(*pieces, axis=0) if len(pieces) > 1 else pieces[0]
    return to_augment_device(fn.slice(clip, start=[0], shape=[num_frames], axes=[0]), mode)


def audio_clip(flac, info, start, fps: int, seconds: float, rate: int, seg_frames: int):
    """The audio that plays with the clip: it starts at the clip's first frame (the packer put
    sample 0 at video frame 0), zero-padded past the end of the track. Decodes only the audio
    segments the window touches (the shard contract: one FLAC file per video segment, P =
    seg_frames * rate / fps samples each), as decode_clip does for the video: a window of n
    samples touches at most ceil((n - 1) / P) + 1 of them, so the graph has that many decoder
    calls. A call past the last segment decodes that one again; the trim to the track's end
    drops it, so the window reads zeros there."""
    n = int(round(seconds * rate))
    per = audio_segment_samples(seg_frames, rate, fps)
    calls = math.ceil((n - 1) / per) + 1
    nseg = field(info, "num_segments")
    audio_offsets = INFO_OFFSETS + 1 + nseg  # after the video segments' offsets
    a0 = fn.cast(fn.cast(start, dtype=types.FLOAT) * (rate / fps), dtype=types.INT32)
    first = a0 // per
    pieces = []
    for i in range(calls):
        k = dmath.min(first + i, nseg - 1)
        lo, hi = info[audio_offsets + k], info[audio_offsets + k + 1]
        data = fn.slice(flac, fn.reshape(lo, shape=[1]), fn.reshape(hi - lo, shape=[1]), axes=[0])
        pieces.append(fn.decoders.audio(data, dtype=types.INT16, downmix=True, sample_rate=rate)[0])
    audio = fn.cat(*pieces) if calls > 1 else pieces[0]
    left = fn.cast(fn.cast(field(info, "audio_samples"), dtype=types.FLOAT) * (rate / field(info, "audio_rate")),
                   dtype=types.INT32) - first * per  # samples of the track from segment `first` on
    audio = fn.slice(audio, fn.reshape(_scalar(0), shape=[1]), fn.reshape(left, shape=[1]), axes=[0],
                     out_of_bounds_policy="trim_to_shape")
    audio = fn.slice(audio, fn.reshape(a0 - first * per, shape=[1]), [n], axes=[0], out_of_bounds_policy="pad")
    return fn.cast(audio, dtype=types.FLOAT)  # raw int16 amplitudes, as the reference's filterbank saw them


def log_mel(audio, cfg):
    """Log mel filterbank energies shaped 1 x n_mels x frames; the defaults reproduce the
    released code's python_speech_features.logfbank call (see configs/, research/gdt.md)."""
    rate = cfg.rate
    win, hop = int(round(cfg.win_seconds * rate)), int(round(cfg.hop_seconds * rate))
    if cfg.preemphasis:
        audio = fn.preemphasis_filter(audio, preemph_coeff=cfg.preemphasis, border="zero")
    window = np.ones(win) if cfg.window == "rect" else np.hanning(win + 1)[:-1]
    spec = fn.spectrogram(audio, nfft=cfg.nfft, window_length=win, window_step=hop,
                          window_fn=window.tolist(), power=2, center_windows=False)
    spec = spec * (1.0 / cfg.nfft)  # logfbank's power spectrum is |FFT|^2 / NFFT
    mel = fn.mel_filter_bank(spec, sample_rate=rate, nfilter=cfg.n_mels, freq_low=0.0,
                             freq_high=rate / 2, mel_formula="htk", normalize=False)
    # Natural log with logfbank's floor at machine epsilon; to_decibels computes m * log10(x / ref).
    logmel = fn.to_decibels(mel, multiplier=math.log(10), reference=1.0,
                            cutoff_db=math.log(np.finfo(np.float64).eps))
    return fn.expand_dims(logmel, axes=[0], new_axis_names="C")
