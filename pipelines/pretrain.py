"""The pretraining graph: one random clip per video per epoch, `views` augmented RGB views of
it from a single decode, and the log-mel spectrogram of the audio that plays with it."""
from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath

from stica.pipelines.clips import (audio_clip, clip_start, decode_clip, field, log_mel, output_dtype, read_shards,
                                   to_augment_device)


def blur(x, sigma, largest: int, mode: str):
    """Gaussian blur of every frame, 2*ceil(3 sigma)+1 taps (99.7% of the Gaussian), at most
    `largest`: a fixed 11-tap window spends most of its taps on zeros for small sigmas.

    On the CPU the two 1-D passes run as fn.filter with the taps computed in the graph: DALI's
    CPU gaussian_blur cost 14-23 ms per 30x112x112 clip on one core whatever the window (3 to 11
    taps), fn.filter 1.8-5.0 ms, outputs within 1 level (2026-12-01, docs/benchmarks.md). The GPU
    paths keep gaussian_blur until a GPU run compares the two there."""
    half = dmath.min(fn.cast(dmath.ceil(sigma * 3.0), dtype=types.INT32), (largest - 1) // 2)
    if mode != "cpu":
        return fn.gaussian_blur(x, window_size=half * 2 + 1, sigma=sigma)
    r = (largest - 1) // 2
    t = fn.cast(fn.constant(idata=list(range(-r, r + 1)), shape=[2 * r + 1], dtype=types.INT32), dtype=types.FLOAT)
    t = fn.slice(t, fn.reshape(r - half, shape=[1]), fn.reshape(half * 2 + 1, shape=[1]), axes=[0])
    taps = dmath.exp(t * t * (-0.5 / (sigma * sigma)))
    taps = taps / fn.reductions.sum(taps)
    x = fn.filter(x, fn.reshape(taps, shape=[1, -1]), border="reflect_101")
    return fn.filter(x, fn.reshape(taps, shape=[-1, 1]), border="reflect_101")


def colour(x, jitter, gray, cfg):
    """Colour jitter and grayscale (each drawn per clip) in one pass over the pixels, one clamp
    at the end (as the reference loader's float code): brightness b, contrast k, saturation and
    hue are all linear in RGB, so color_twist applies them as one matrix.

    Contrast scales the distance from the clip's mean grey g, as torchvision's ColorJitter (the
    released code's) does per image: out = b*k*x + b*(1-k)*g. color_twist's own contrast pivots
    at mid-range (B*K*x + B*(1-K)*128; a clip of mean grey 60 had its mean moved by up to 27
    levels and its shadows crushed to 0), so the B and K that give the same line are passed:
    one operator fewer than brightness_contrast then color_twist, 2% of the augment graph's CPU.
    A grayscale clip is converted to one channel first: luma is all that is left of it, and the
    rest of its colour change runs on a third of the values (with every clip gray the CPU
    augment graph spent 21% less; color_twist costs ~10 ms per 30x112x112 clip on one core)."""
    j = fn.cast(jitter, dtype=types.FLOAT)
    draw = lambda amount: 1.0 + j * fn.random.uniform(range=[-amount, amount]) if amount > 0 else 1.0
    b, k, s = draw(cfg.brightness), draw(cfg.contrast), draw(cfg.saturation)
    means = fn.reductions.mean(x, axes=[0, 1, 2])
    g = means[0] * 0.299 + means[1] * 0.587 + means[2] * 0.114
    if g.device == "gpu":  # an argument input must live on the CPU (the dynamic executor copies it)
        g = g.cpu()
    line = dmath.max(128.0 * k + g * (1.0 - k), 1e-3)  # > 0 for any contrast amount below 1
    brightness, contrast = b * line * (1.0 / 128.0), 128.0 * k / line
    if gray:
        y = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
        y = fn.brightness_contrast(y, brightness=brightness, contrast=contrast)  # pivots at 128 too
        return fn.cat(y, y, y, axis=3)
    hue = j * fn.random.uniform(range=[-cfg.hue, cfg.hue]) if cfg.hue > 0 else 0.0
    return fn.color_twist(x, brightness=brightness, contrast=contrast, saturation=s, hue=hue)


def video_view(clip, cfg, out_dtype, mode: str):
    """One SimCLR-style view. Every random value is drawn once per sample, so all frames of a
    clip get the same crop, flip and colour change; calling this twice gives independent views.

    Deliberate difference from the released code: colour jitter runs on [0, 255] pixels before
    normalisation (the released code jitters the normalised tensor, where 'brightness' pulls
    towards the mean grey), and grayscale uses RGB weights (the released code swaps R and B).
    """
    x = fn.random_resized_crop(clip, size=[cfg.crop_size] * 2, random_area=list(cfg.crop_scale),
                               random_aspect_ratio=list(cfg.crop_ratio), antialias=False)
    jitter = fn.random.coin_flip(probability=cfg.jitter_prob)
    gray = fn.random.coin_flip(probability=cfg.grayscale_prob)
    # The colour ops run only for the clips that draw them (the conditionals split the batch):
    # with the defaults 16% of clips draw neither, and the CPU loader spent 3-6% less CPU a clip,
    # in 8 pairs of 8 (docs/benchmarks.md). A config that turns colour off leaves them out of the graph.
    if cfg.jitter_prob > 0 or cfg.grayscale_prob > 0:
        if jitter | gray:
            x = colour(x, jitter, gray, cfg)
    if fn.random.coin_flip(probability=cfg.blur_prob):
        x = blur(x, fn.random.uniform(range=list(cfg.blur_sigma)), cfg.blur_kernel, mode)
    return fn.crop_mirror_normalize(x, mirror=fn.random.coin_flip(probability=cfg.flip_prob),
                                    mean=[255 * m for m in cfg.mean], std=[255 * s for s in cfg.std],
                                    dtype=out_dtype, output_layout="CFHW")


def draw(tars, idxs, cfg, shard_id: int, num_shards: int, seed: int):
    """The samples in their shuffled order and each one's clip start: the part of the graph that
    every pretraining mode shares, so a seed gives the same clips whichever decodes them."""
    segs, flac, info, key = read_shards(tars, idxs, shard_id, num_shards, shuffle=True,
                                        shuffle_buffer=cfg.shuffle_buffer, seed=seed)
    return segs, flac, info, key, clip_start(info, cfg.num_frames, (seed + 1) % 2**31)


def augment(clip, audio, cfg, mode: str):
    """`views` augmented views of a decoded clip (FHWC uint8) and its audio's log-mel spectrogram."""
    views = [video_view(clip, cfg, output_dtype(cfg, mode), mode) for _ in range(cfg.views)]
    lo, hi = cfg.audio.volume_jitter
    if hi > lo:
        audio = audio * fn.random.uniform(range=[lo, hi])
    return views, log_mel(to_augment_device(audio, mode), cfg.audio)


@pipeline_def(enable_conditionals=True)
def pretrain_pipeline(tars, idxs, cfg, seg_frames: int, fps: int, shard_id: int, num_shards: int, mode: str,
                      draw_seed: int):
    segs, flac, info, key, start = draw(tars, idxs, cfg, shard_id, num_shards, draw_seed)
    T = cfg.num_frames
    clip = decode_clip(segs, info, start, T, seg_frames, mode)
    audio = audio_clip(flac, info, start, fps, T / fps, cfg.audio.rate, seg_frames)
    views, spec = augment(clip, audio, cfg, mode)
    return (*views, spec, field(info, "label_index"), field(info, "has_audio"), start, key)
