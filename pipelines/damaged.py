"""Samples DALI cannot decode at train or evaluation time: found, named, and replaced by a valid one.

DALI works on whole batches: one sample it cannot decode fails the batch and leaves the
pipeline unusable, and its message names no sample ('Failed to create video decoder for
"memory file"': the clip's segments are slices of the video member). Rerunning would trip on
the same batch again. So when a batch fails, the loader:

1. replays this epoch's reader alone (no decoding; the same reader, seed and order as the
   training pipeline) up to the failed batch, to get the raw members of its samples;
2. decodes every segment and the audio of each of them on its own, with the decoder the
   training graph uses: the ones that fail are the damaged samples, named with DALI's reason;
3. points each damaged sample's entry of a private copy of its shard's index at the nearest
   valid sample of the same shard. The sample count and order stay as they were, so every
   rank keeps its share of the epoch and its number of batches (DDP ranks stay in step), and
   the epoch is rebuilt and replayed to the failed batch, which now holds the substitute twice.
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np

from stica.pipelines.clips import parse_source_info, read_shards
from stica.shards import read_index, split_audio, split_segments


def batch_members(tars, idxs, batch_size: int, shard_id: int, num_shards: int, shuffle: bool, shuffle_buffer: int,
                  seed: int, batch: int) -> list[dict]:
    """The raw members of batch `batch` of an epoch, from the reader alone: the reader is the
    training (or evaluation) graph's first operator, so read alike it draws the same order."""
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, seed=seed, exec_dynamic=True)
    def reader():
        return read_shards(tars, idxs, shard_id, num_shards, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                           seed=seed)

    pipe = reader()
    pipe.build()
    for _ in range(batch):
        pipe.run()
    segs, flac, info, key = ([np.array(t) for t in out] for out in pipe.run())
    del pipe
    members = []
    for i in range(batch_size):
        path, offset, name = parse_source_info(key[i])
        members.append({"tar": path, "offset": offset, "key": name, "segs": segs[i], "flac": flac[i], "info": info[i]})
    return members


def probe(member: dict, device: str, audio_rate: int, device_id: int = 0) -> str | None:
    """Why DALI cannot decode this sample, or None: every segment of its video member and its audio,
    each alone, on the training graph's decoder (device: cpu or mixed)."""
    info = member["info"].astype("<i4").tobytes()
    pieces = split_segments(member["segs"].tobytes(), info)
    sounds = split_audio(member["flac"].tobytes(), info)
    checks = [(f"segment {k} of {len(pieces)}", "video", p) for k, p in enumerate(pieces)] + \
        [(f"audio segment {k} of {len(sounds)}", "audio", p) for k, p in enumerate(sounds)]
    for name, kind, data in checks:
        pipe = _decoder(kind, np.frombuffer(data, np.uint8), device, audio_rate, device_id)
        pipe.build()  # outside the try: a graph that cannot build is a bug here, not a damaged sample
        try:
            pipe.run()
        except RuntimeError as e:
            return f"{name}: {dali_reason(e)}"
        finally:
            del pipe
    return None


def dali_reason(error: Exception) -> str:
    """The line of a DALI error that says what failed (its first lines are boilerplate)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if "fail" in line.lower() or "invalid data" in line.lower()]
    return (telling or lines or [type(error).__name__])[0][:300]


def _decoder(kind: str, data: np.ndarray, device: str, audio_rate: int, device_id: int):
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id if device == "mixed" else None, exec_dynamic=True)
    def one():
        encoded = fn.external_source(source=lambda: [data], batch=True)
        if kind == "video":
            return fn.decoders.video(encoded, device=device)
        audio, _ = fn.decoders.audio(encoded, sample_rate=audio_rate)
        return audio

    return one()


class Substitutes:
    """Private copies of the shards' index files in which each damaged sample's line is the
    line of the nearest valid sample of its shard."""

    def __init__(self):
        self.dir: Path | None = None  # made for the first damaged sample, removed with this object
        self.bad: dict[tuple[str, int], str] = {}  # (tar, segs offset) -> key

    def add(self, tar: str, offset: int, key: str):
        self.bad[(tar, offset)] = key

    def index_paths(self, tars: list[str], idxs: list[str]) -> list[str]:
        out = []
        for tar, idx in zip(tars, idxs):
            offsets = {o for t, o in self.bad if t == tar}
            if not offsets:
                out.append(idx)
                continue
            header, *lines = Path(idx).read_text().splitlines()
            segs = [members["segs"][0] for _, members in read_index(idx)]
            good = [j for j, o in enumerate(segs) if o not in offsets]
            if not good:
                raise RuntimeError(f"{tar}: every sample is damaged; repack it (stica-shard verify names them)")
            for j, o in enumerate(segs):
                if o in offsets:
                    lines[j] = lines[min(good, key=lambda g: (abs(g - j), g))]
            if self.dir is None:
                self.dir = Path(tempfile.mkdtemp(prefix="stica-substitutes-"))
                weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)
            path = self.dir / f"{len(out):06d}-{Path(idx).name}"
            path.write_text("\n".join([header, *lines]) + "\n")
            out.append(str(path))
        return out
