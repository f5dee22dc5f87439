"""One source video -> the members of one shard sample (see stica/shards.py), or a PackError.

Decoding, resampling and encoding are FFmpeg's, through PyAV; what is ours is the
constant-frame-rate timeline, the audio alignment and the checks that name a reason.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from stica.media import decode_flac, iter_frames
from stica.shards import FORMAT_VERSION, audio_segment_samples, pack_info
from stica.tools.display import PACKED_MATRIX, PACKED_RANGE, output_size, packed_frame, probe

CODECS = {  # name -> (encoder, container, options)
    # bf=0 / lag-free settings: DALI's index drops packets with negative pts (research/dali.md).
    "vp9": ("libvpx-vp9", "webm", {"b": "0", "row-mt": "0", "deadline": "good"}),
    "h264": ("libx264", "mp4", {"bf": "0", "preset": "veryfast", "x264-params": "scenecut=0"}),
}
BITEXACT = {"fflags": "+bitexact"}  # no random track UIDs or version strings: byte-identical reruns


@dataclass(frozen=True)
class PackOptions:
    fps: int = 30
    short_side: int = 128
    codec: str = "vp9"
    crf: int = 32
    speed: int = 4  # libvpx cpu-used; ignored for h264
    seg_frames: int = 30
    audio_rate: int = 24000
    min_frames: int = 30
    allow_no_audio: bool = False
    # A stream that decodes to less than this share of the duration its container declares is truncated.
    min_decoded_share: float = 0.9
    # Corrupt packets are concealed (video: the previous frame held; audio: silence for the lost
    # span) unless they lose more than this share of the duration or this many seconds.
    max_lost_share: float = 0.02
    max_lost_seconds: float = 1.0


class PackError(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


class SegmentEncoder:
    """Cuts the output frame sequence into independent files of `seg_frames` frames each."""

    def __init__(self, opts: PackOptions, width: int, height: int, primaries: int, transfer: int):
        self.opts, self.width, self.height = opts, width, height
        self.primaries, self.transfer = primaries, transfer
        self.segments: list[bytes] = []
        self.lengths: list[int] = []
        self._open()

    def _open(self):
        encoder, fmt, options = CODECS[self.opts.codec]
        self._buf = io.BytesIO()
        self._out = av.open(self._buf, "w", format=fmt, options=BITEXACT)
        stream = self._out.add_stream(encoder, rate=self.opts.fps)
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
        # Tagged with what it holds (tools/display.py): the matrix and levels it was converted to,
        # the primaries and transfer it kept from the source.
        cc = stream.codec_context
        cc.colorspace, cc.color_range = PACKED_MATRIX, PACKED_RANGE
        cc.color_primaries, cc.color_trc = self.primaries, self.transfer
        stream.thread_count = 1  # parallelism comes from packing videos side by side; 1 thread is deterministic
        stream.options = {**options, "crf": str(self.opts.crf), "g": str(self.opts.seg_frames),
                          **({"cpu-used": str(self.opts.speed)} if self.opts.codec == "vp9" else {})}
        self._stream, self._count = stream, 0

    def _close(self):
        for packet in self._stream.encode():
            self._out.mux(packet)
        self._out.close()
        self.segments.append(self._buf.getvalue())
        self.lengths.append(self._count)

    def add(self, frame: av.VideoFrame):
        if self._count == self.opts.seg_frames:
            self._close()
            self._open()
        frame.pts, frame.time_base = self._count, Fraction(1, self.opts.fps)
        for packet in self._stream.encode(frame):
            self._out.mux(packet)
        self._count += 1

    def finish(self) -> list[bytes]:
        self._close()
        return self.segments


def _open(path: Path):
    if not path.exists():
        raise PackError("open", "file not found")
    if path.stat().st_size == 0:
        raise PackError("open", "empty file (0 bytes)")
    try:
        return av.open(str(path))
    except av.FFmpegError as e:
        raise PackError("open", f"not a readable media file ({e})") from None


def _declared_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration else None


class AudioTrack:
    """Decoded audio resampled to mono s16 at `rate`, each frame placed by its timestamp: where
    the timestamps jump ahead (packets lost, or never there) the span is silence, where they go
    back the repeated samples are dropped. Concatenating in decode order instead shifted every
    later sound by the size of the gap."""

    def __init__(self, rate: int):
        self.rate, self.resampler = rate, av.AudioResampler(format="s16", layout="mono", rate=rate)
        self.chunks, self.start, self.placed = [], None, 0
        self.gap = self.overlap = self._trim = 0
        self.tolerance = round(0.01 * rate)  # below 10 ms: timestamp rounding and resampler delay

    def add(self, frame):
        if self.start is None:
            self.start = float(frame.time or 0.0)
        elif frame.time is not None:
            # Where this frame's first sample lands if nothing is done: after what is placed,
            # less the samples still to be dropped for an earlier overlap.
            lag = round((frame.time - self.start) * self.rate) - (self.placed - self._trim)
            if lag > self.tolerance:
                self.chunks.append(np.zeros(lag, np.int16))
                self.placed += lag
                self.gap += lag
            elif lag < -self.tolerance:
                self._trim += -lag
        self._append(self.resampler.resample(frame))

    def flush(self):
        self._append(self.resampler.resample(None))

    def _append(self, frames):
        for f in frames:
            samples = f.to_ndarray().reshape(-1)
            cut = min(self._trim, len(samples))
            self._trim -= cut
            self.overlap += cut
            self.chunks.append(samples[cut:])
            self.placed += len(samples) - cut


def _stream_end(stream, t0: float) -> float | None:
    """When the video stream declares it ends, in seconds after its first frame (t0)."""
    if not stream.duration or stream.time_base is None:
        return None
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    return float(stream.duration * stream.time_base) + start - t0


def _frame_time(frame, index: int, rate: float) -> float:
    return float(frame.time) if frame.time is not None else index / rate


def transcode(path: str | Path, key: str, label: str, label_index: int, opts: PackOptions) -> dict:
    """Return {"members": {ext: bytes}, "meta": {...}}; raise PackError naming the stage and reason."""
    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise PackError("probe", "no video stream")
        vstream = container.streams.video[0]
        astream = container.streams.audio[0] if container.streams.audio else None
        if astream is None and not opts.allow_no_audio:
            raise PackError("probe", "no audio stream (pass --allow-no-audio to pack it with silence)")
        vstream.thread_count = 1
        src_rate = float(vstream.average_rate or opts.fps)
        display = encoder = None  # from the first decoded frame: its side data carries the display matrix
        audio = AudioTrack(opts.audio_rate)
        t0 = held = None
        emitted = n_src = 0
        last_t = gap = 0.0
        lost = {"video": [0, 0.0], "audio": [0, 0.0]}  # packets, seconds
        streams = [vstream] + ([astream] if astream is not None else [])
        try:
            for packet in container.demux(streams):
                try:
                    frames = packet.decode()
                except av.FFmpegError:  # one bad packet: conceal it, count it, go on
                    kind = "audio" if packet.stream is astream else "video"
                    lost[kind][0] += 1
                    if packet.duration and packet.time_base:
                        lost[kind][1] += float(packet.duration * packet.time_base)
                    continue
                for frame in frames:
                    if packet.stream is astream:
                        audio.add(frame)
                        continue
                    t = _frame_time(frame, n_src, src_rate)
                    if t0 is None:
                        try:
                            t0, display = t, probe(frame, vstream)
                        except ValueError as e:
                            raise PackError("probe", str(e)) from None
                        width, height = output_size(display, opts.short_side)
                        encoder = SegmentEncoder(opts, width, height, frame.color_primaries, frame.color_trc)
                    # Constant frame rate by sample-and-hold: output frame i shows the last source
                    # frame whose time, rounded to the output grid, is <= i (FFmpeg's fps filter rule).
                    # Repeats and drops happen here, so VFR sources map to time correctly.
                    slot = round((t - t0) * opts.fps)
                    while held is not None and emitted < slot:
                        encoder.add(held)
                        emitted += 1
                    held = packed_frame(frame, display, width, height)
                    gap = t - last_t if n_src else gap
                    last_t, n_src = t, n_src + 1
            if astream is not None:
                audio.flush()
        except av.FFmpegError as e:
            raise PackError("decode", f"undecodable ({e})") from None
        if held is None:
            raise PackError("decode", "the video stream has no decodable frame")
        frame_dur = float(1 / src_rate) if gap <= 0 else gap
        duration = last_t - t0 + frame_dur  # the last frame lasts as long as the gap before it...
        end = _stream_end(vstream, t0)
        if end is not None and last_t - t0 < end < duration:
            duration = end  # ...unless the stream says when it ends (VFR: that gap can be long)
        declared = _declared_duration(container, vstream)
        lost_seconds = max(lost["video"][1], lost["audio"][1])
        if lost_seconds > min(opts.max_lost_seconds, opts.max_lost_share * (declared or duration)):
            raise PackError("decode", f"{lost['video'][0]} video and {lost['audio'][0]} audio packets do not "
                                      f"decode: {lost_seconds:.2f} s lost, more than concealment is allowed "
                                      f"({opts.max_lost_share:.0%} of the duration, at most {opts.max_lost_seconds} s)")
        if declared and duration < opts.min_decoded_share * declared:
            raise PackError("decode", f"truncated: decoded {duration:.2f} s of the {declared:.2f} s the file declares")
        num_frames = max(emitted + 1, round(duration * opts.fps))
        if num_frames < opts.min_frames:
            raise PackError("length", f"shorter than one clip: {num_frames} frames at {opts.fps} fps "
                                      f"< {opts.min_frames}")
        while emitted < num_frames:
            encoder.add(held)
            emitted += 1
        segments = encoder.finish()

    audio_samples = num_frames * opts.audio_rate // opts.fps
    if astream is not None and audio.chunks:
        pcm = np.concatenate(audio.chunks)
        # Put sample 0 at the first video frame: containers often start audio and video apart.
        shift = round((audio.start - t0) * opts.audio_rate)
        pcm = np.concatenate([np.zeros(shift, np.int16), pcm]) if shift > 0 else pcm[-shift:]
    else:
        if astream is not None:
            raise PackError("audio", "the audio stream has no decodable frame")
        pcm = np.zeros(0, np.int16)
    audio_pad = max(0, audio_samples - len(pcm))
    pcm = np.pad(pcm, (0, audio_pad))[:audio_samples]
    # One FLAC file per video segment (the shard contract, stica/shards.py): a clip's second is
    # then decoded from the one or two segments it touches.
    per = audio_segment_samples(opts.seg_frames, opts.audio_rate, opts.fps)
    bounds = [k * per for k in range(len(segments))] + [audio_samples]
    flacs = [encode_flac(pcm[a:b], opts.audio_rate) for a, b in zip(bounds[:-1], bounds[1:])]
    validate(segments, encoder.lengths, flacs, [b - a for a, b in zip(bounds[:-1], bounds[1:])], path)

    offsets = np.concatenate([[0], np.cumsum([len(s) for s in segments])]).tolist()
    audio_offsets = np.concatenate([[0], np.cumsum([len(f) for f in flacs])]).tolist()
    meta = {
        "version": FORMAT_VERSION, "key": key, "label": label, "label_index": label_index,
        "num_frames": num_frames, "fps": opts.fps, "duration": num_frames / opts.fps,
        "width": width, "height": height, "codec": opts.codec,
        "has_audio": int(astream is not None), "audio_rate": opts.audio_rate,
        "audio_samples": audio_samples, "audio_padded_seconds": round(audio_pad / opts.audio_rate, 3),
        "audio_gap_seconds": round(audio.gap / opts.audio_rate, 3),
        "audio_overlap_seconds": round(audio.overlap / opts.audio_rate, 3),
        "concealed_packets": {k: v[0] for k, v in lost.items()},
        "concealed_seconds": round(lost_seconds, 3),
        "seg_frames": opts.seg_frames, "num_segments": len(segments), "source": path.name,
        "source_fps": round(src_rate, 3), "source_width": vstream.codec_context.width,
        "source_height": vstream.codec_context.height, "display": display.record(),
    }
    members = {
        "segs": b"".join(segments),
        "flac": b"".join(flacs),
        "info": pack_info(meta, offsets, audio_offsets),
        "json": json.dumps(meta, sort_keys=True).encode(),
        "cls": str(label_index).encode(),
    }
    return {"members": members, "meta": meta}


def encode_flac(audio: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    # FFmpeg's FLAC muxer reserves 8 KiB of header padding by default: 80 KiB of nothing in a
    # 10-segment sample.
    with av.open(buf, "w", format="flac", options={**BITEXACT, "metadata_header_padding": "0"}) as out:
        stream = out.add_stream("flac", rate=rate, layout="mono")
        stream.format = "s16"
        block = 4096
        for start in range(0, len(audio), block):
            frame = av.AudioFrame.from_ndarray(audio[None, start:start + block], format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def validate(segments: list[bytes], lengths: list[int], flacs: list[bytes], samples: list[int], path: Path):
    """Decode what was packed before it counts: a bad member would fail a whole DALI batch later."""
    try:
        for k, (seg, n) in enumerate(zip(segments, lengths)):
            got = sum(1 for _ in iter_frames(seg))
            if got != n:
                raise PackError("validate", f"segment {k} decodes to {got} frames, expected {n}")
        for k, (flac, n) in enumerate(zip(flacs, samples)):
            got = len(decode_flac(flac))
            if got != n:
                raise PackError("validate", f"audio segment {k} decodes to {got} samples, expected {n}")
    except av.FFmpegError as e:
        raise PackError("validate", f"packed output does not decode ({e})") from None