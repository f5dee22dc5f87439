"""Write small audio-visual files with PyAV: test media and the demo corpus need no downloads."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import av
import numpy as np

CONTAINER_CODECS = {  # suffix -> (video encoder, audio encoder)
    ".mp4": ("libx264", "aac"),
    ".mkv": ("libx264", "flac"),
    ".webm": ("libvpx-vp9", "libopus"),
    ".avi": ("mpeg4", "ac3"),
    ".mpg": ("mpeg2video", "mp2"),
    ".mov": ("mjpeg", "libmp3lame"),
}


def write_av(
    path: str | Path,
    frame_fn: Callable[[float], np.ndarray],
    frame_times: Sequence[float],
    audio_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    audio_rate: int = 44100,
    audio_start: float = 0.0,
    audio_duration: float | None = None,
    size: tuple[int, int] = (160, 120),
) -> Path:
    """Frame i shows frame_fn(frame_times[i]) from frame_times[i] on (VFR when times are uneven).

    The audio track, if any, carries audio_fn(t) for t from audio_start (seconds on the video's
    clock) for audio_duration seconds (default: to the end of the video).
    """
    path = Path(path)
    vcodec, acodec = CONTAINER_CODECS[path.suffix]
    end = frame_times[-1] + (frame_times[-1] - frame_times[-2])
    with av.open(str(path), "w") as out:
        vs = out.add_stream(vcodec, rate=30)
        vs.width, vs.height = size
        vs.pix_fmt = "yuvj420p" if vcodec == "mjpeg" else "yuv420p"
        vs.time_base = Fraction(1, 1000)
        if vcodec == "libx264":
            vs.options = {"bf": "0"}
        astream = None
        if audio_fn is not None:
            if acodec == "libopus":
                audio_rate = 48000  # the only rate libopus takes
            astream = out.add_stream(acodec, rate=audio_rate, layout="mono")
        for t in frame_times:
            frame = av.VideoFrame.from_ndarray(frame_fn(t), format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            out.mux(vs.encode(frame))
        out.mux(vs.encode())
        if astream is not None:
            fmt = astream.codec_context.format.name
            n = round((audio_duration if audio_duration is not None else end - audio_start) * audio_rate)
            wave = audio_fn(audio_start + np.arange(n) / audio_rate).astype(np.float32)
            block = astream.codec_context.frame_size or 1024
            pts0 = round(audio_start * audio_rate)
            for i in range(0, n, block):
                chunk = wave[i:i + block]
                if len(chunk) < block and astream.codec_context.frame_size:
                    chunk = np.pad(chunk, (0, block - len(chunk)))
                frame = av.AudioFrame.from_ndarray(_to_format(chunk[None], fmt), format=fmt, layout="mono")
                frame.sample_rate, frame.pts = audio_rate, pts0 + i
                frame.time_base = Fraction(1, audio_rate)
                out.mux(astream.encode(frame))
            out.mux(astream.encode())
    return path


def _to_format(data: np.ndarray, fmt: str) -> np.ndarray:
    if fmt.startswith("s16"):
        return (np.clip(data, -1, 1) * 32767).astype(np.int16)
    if fmt.startswith("s32"):
        return (np.clip(data, -1, 1) * (2**31 - 1)).astype(np.int32)
    return data.astype(np.float32)


def uniform_times(seconds: float, fps: float) -> list[float]:
    return [i / fps for i in range(round(seconds * fps))]


def gray_frame(value: int, size: tuple[int, int] = (160, 120)) -> np.ndarray:
    return np.full((size[1], size[0], 3), value, np.uint8)


def tone(freq: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda t: 0.5 * np.sin(2 * np.pi * freq * t)


def write_scene(path: str | Path, seed: int, seconds: float, size: tuple[int, int] = (228, 128)) -> Path:
    """A clip that looks more like a camera's than a flat test card: a smooth random texture
    panning at a random speed, a bright disc crossing it, and a soundtrack of two amplitude-
    modulated tones over noise. Its codecs, bit rates and decode costs resemble real footage's."""
    rng = np.random.default_rng(seed)
    W, H = size
    coarse = rng.uniform(0, 255, (H // 16 + 3, 2 * W // 16 + 3, 3)).astype(np.float32)
    texture = np.repeat(np.repeat(coarse, 16, 0), 16, 1)
    for axis in (0, 1):  # box blur, twice: smooth blobs with some detail left
        for _ in range(2):
            texture = (np.roll(texture, 4, axis) + texture + np.roll(texture, -4, axis)) / 3
    texture += rng.normal(0, 6, texture.shape)  # sensor-like grain, so the codec has detail to keep
    speed, disc_speed = rng.uniform(10, 40), rng.uniform(20, 60)
    colour, y0 = rng.uniform(150, 255, 3), rng.uniform(0.3, 0.7) * H
    yy, xx = np.mgrid[0:H, 0:W]

    def frame(t):
        x0 = int(speed * t) % W
        img = texture[:H, x0:x0 + W].copy()
        disc = (xx - (disc_speed * t) % W) ** 2 + (yy - y0) ** 2 < (H / 8) ** 2
        img[disc] = colour
        return np.clip(img, 0, 255).astype(np.uint8)

    f1, f2, rate = rng.uniform(150, 400), rng.uniform(500, 2000), rng.uniform(0.5, 3)

    def sound(t):
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rate * t)
        noise = np.random.default_rng(seed + 1).normal(0, 0.05, t.shape)
        return 0.3 * np.sin(2 * np.pi * f1 * t) + 0.2 * envelope * np.sin(2 * np.pi * f2 * t) + noise

    return write_av(path, frame, uniform_times(seconds, 30), sound, audio_rate=24000, size=size)
