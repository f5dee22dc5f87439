"""The evaluation graph: deterministic, N uniformly spaced clips per video x spatial crops, no
colour augmentation. One sample per video, so clips group back per video by construction."""
from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

from stica.pipelines.clips import audio_clip, decode_clip, field, log_mel, output_dtype, read_shards, to_augment_device

CROPS = {3: [0.0, 0.5, 1.0], 1: [0.5]}  # left/centre/right (or top/centre/bottom) along the long side


def clip_starts(num_frames, clip_frames: int, clips: int):
    """Clip j starts at floor(j * (F - T) / (N - 1)): the first clip at 0, the last one ending at F."""
    span = fn.cast(num_frames - clip_frames, dtype=types.FLOAT)
    span = span * fn.cast(span > 0, dtype=types.FLOAT)
    return [fn.cast(span * (j / max(1, clips - 1)), dtype=types.INT32) for j in range(clips)]


def spatial_crops(clip, size: int, crops: int, mean, std, out_dtype):
    # Short side to `size`, then square crops spread over the long side.
    x = fn.resize(clip, resize_shorter=size, antialias=True)
    return [fn.crop_mirror_normalize(x, crop=[size, size], crop_pos_x=p, crop_pos_y=p, dtype=out_dtype,
                                     mean=[255 * m for m in mean], std=[255 * s for s in std],
                                     output_layout="CFHW")
            for p in CROPS[crops]]


@pipeline_def
def eval_pipeline(tars, idxs, cfg, seg_frames: int, fps: int, shard_id: int, num_shards: int, mode: str):
    segs, flac, info, key = read_shards(tars, idxs, shard_id, num_shards, shuffle=False, shuffle_buffer=1, seed=0)
    T = cfg.num_frames
    out_dtype = output_dtype(cfg, mode)
    starts = clip_starts(field(info, "num_frames"), T, cfg.eval_clips)
    videos, audios = [], []
    for start in starts:
        clip = decode_clip(segs, info, start, T, seg_frames, mode)
        videos += spatial_crops(clip, cfg.crop_size, cfg.eval_crops, cfg.mean, cfg.std, out_dtype)
        audio = audio_clip(flac, info, start, fps, T / fps, cfg.audio.rate, seg_frames)
        audios.append(log_mel(to_augment_device(audio, mode), cfg.audio))
    # video: [clips * crops, C, T, H, W] (clip-major); audio: [clips, 1, mels, frames]
    video = fn.stack(*videos)
    return video, fn.stack(*audios), field(info, "label_index"), field(info, "has_audio"), fn.stack(*starts), key
