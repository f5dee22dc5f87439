"""The nvdec loader mode (data.device=nvdec): DALI draws, long-lived decoder sessions decode,
DALI augments.

Three stages per batch, overlapped:
1. the draw pipeline (CPU): the shards' reader, each clip's start and its audio window, the
   same graph pieces (pretrain.draw, clips.audio_clip) and seeds as the other modes, so a seed
   gives the same clips (starts, frames, time-coded audio) whichever mode decodes them;
2. the session pool (pipelines/sessions.py) decodes each clip's segments into a preallocated
   buffer; batch b+1 is handed to the pool before batch b is given to stage 3;
3. the augment pipeline: the decoded clips and their audio enter through an external source
   into pretrain.augment, the views and spectrogram graph of `hybrid` and `mixed`.

A clip that fails to decode is named (shard, key, reason) and counted as the DALI modes count
theirs (loader.new_bad_samples, then the run's bad_samples.jsonl); a valid clip of the same
batch stands in for it in that batch, and from the next epoch on the nearest valid sample of
its shard does, as in the other modes. Resuming mid-epoch fast-forwards the draw pipeline
without decoding.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def

from stica.pipelines.clips import audio_clip, parse_source_info
from stica.pipelines.loader import DaliLoader
from stica.pipelines.pretrain import augment, draw
from stica.pipelines.sessions import ClipJob, FrameRing, NvdecSession, PyAVSession, SessionPool
from stica.shards import clip_segments, load_manifest, parse_info


@pipeline_def
def draw_pipeline(tars, idxs, cfg, seg_frames: int, fps: int, shard_id: int, num_shards: int, draw_seed: int):
    segs, flac, info, key, start = draw(tars, idxs, cfg, shard_id, num_shards, draw_seed)
    audio = audio_clip(flac, info, start, fps, cfg.num_frames / fps, cfg.audio.rate, seg_frames)
    return segs, info, start, audio, key


@pipeline_def(enable_conditionals=True)
def augment_pipeline(cfg, mode: str, source, stream):
    clip, audio = fn.external_source(source, num_outputs=2, batch=True, layout=["FHWC", ""], cuda_stream=stream,
                                     device="cpu" if mode == "cpu" else "gpu")
    views, spec = augment(clip, audio, cfg, mode)
    return (*views, spec)


class NvdecLoader(DaliLoader):
    """DaliLoader's epochs, state and damaged-sample bookkeeping, with decoding done by a
    SessionPool that lives as long as the loader (across epochs). sessions: 'nvdec' (the GPU)
    or 'pyav' (the same pool on the CPU; tests and CPU benchmarks)."""

    RING_DEPTH = 3  # batches in flight: the one being copied by DALI, the one being decoded, one spare

    def __init__(self, cfg, rank: int = 0, world: int = 1, local_rank: int = 0, state: dict | None = None,
                 bad_samples: list[dict] = (), sessions: str = "nvdec"):
        opts = load_manifest(cfg.shards)["options"]
        if sessions == "nvdec":
            make = lambda slot: NvdecSession(opts["codec"], slot, local_rank)
            self.gpu = torch.device("cuda", local_rank)
        elif sessions == "pyav":
            make = lambda slot: PyAVSession(opts["codec"], slot)
            self.gpu = None
        else:
            raise ValueError(f"decoder sessions must be nvdec or pyav, not {sessions!r}")
        self.pool = SessionPool(make, cfg.sessions)
        self.ring = FrameRing(self.RING_DEPTH, cfg.batch_size, self.gpu or torch.device("cpu"))
        self.feed_stream = torch.cuda.Stream(self.gpu) if self.gpu else None
        super().__init__(cfg, rank, world, local_rank, "pretrain", state=state, bad_samples=bad_samples,
                         device="nvdec" if self.gpu else "cpu")

    def _build(self, epoch: int):
        cfg, reader = self.cfg, self._reader(epoch)
        common = dict(batch_size=cfg.batch_size, num_threads=cfg.threads, prefetch_queue_depth=cfg.prefetch,
                      exec_dynamic=True)
        drawing = draw_pipeline(reader["tars"], reader["idxs"], cfg, self.opts["seg_frames"], self.opts["fps"],
                                reader["shard_id"], self.world, reader["seed"], device_id=None, seed=reader["seed"],
                                **common)
        drawing.build()
        # What DALIGenericIterator(reader_name=..., DROP) counts: the padded epoch split over the
        # shards, whole batches only (the test holds the two modes to the same length).
        batches = drawing.reader_meta("reader")["epoch_size_padded"] // self.world // cfg.batch_size
        skip = self.batch if epoch == self.epoch else 0
        if skip >= batches:  # the epoch was read to its end: nothing to draw or decode
            return _Epoch(None, None, self.video_names, batches, batches)
        feed = _Feed(self, drawing, epoch, batches, skip)
        mode = "cpu" if self.gpu is None else "hybrid"  # augmentation where hybrid and mixed run it
        augmenting = augment_pipeline(cfg, mode, feed, self.feed_stream, device_id=self.local_rank if self.gpu else None,
                                      seed=(reader["seed"] + 2) % 2**31, **common)
        augmenting.build()
        return _Epoch(augmenting, feed, self.video_names, batches, skip)

    def close(self):
        self.pool.close()


class _Feed:
    """The augment pipeline's source: one batch of decoded clips and audio per call, the next
    batch already with the pool. Keeps each batch's labels, starts and keys for _Epoch."""

    def __init__(self, loader: NvdecLoader, drawing, epoch: int, batches: int, skip: int):
        self.loader, self.drawing, self.epoch, self.batches = loader, drawing, epoch, batches
        for _ in range(skip):  # resuming: the reader and the starts move on, nothing is decoded
            drawing.run()
        self.drawn, self.meta = skip, deque()
        self.copied = [None] * loader.RING_DEPTH  # per ring place: the event after DALI's copy of it
        self.pending = self._submit()

    def _submit(self):
        if self.drawn >= self.batches:
            return None
        b, self.drawn = self.drawn, self.drawn + 1
        segs, info, start, audio, key = ([np.asarray(t) for t in out] for out in self.drawing.run())
        loader, T = self.loader, self.loader.cfg.num_frames
        jobs, metas = [], []
        for i in range(len(info)):
            meta, offsets = parse_info(info[i])
            metas.append(meta)
            pieces = clip_segments(segs[i], meta, offsets, int(start[i]), T)
            out = loader.ring.clip(b, i, (T, meta["height"], meta["width"], 3))
            jobs.append(ClipJob(i, pieces, out, after=self.copied[b % loader.RING_DEPTH]))
        return b, loader.pool.submit(jobs), jobs, {"start": start, "audio": audio, "key": key, "meta": metas}

    def __call__(self):
        loader = self.loader
        if loader.feed_stream is not None and self.drawn > 1:  # DALI has queued its copy of the last batch
            event = torch.cuda.Event()
            event.record(loader.feed_stream)
            self.copied[(self.drawn - 2) % loader.RING_DEPTH] = event
        current = self.pending
        if current is None:
            raise StopIteration
        self.pending = self._submit()
        b, ticket, jobs, drawn = current
        results = loader.pool.results(ticket)
        order = self._stand_ins(b, results, drawn)
        frames = [jobs[j].out for j in order]
        audio = np.stack([drawn["audio"][j] for j in order])
        metas = drawn["meta"]
        self.meta.append({"label": torch.tensor([metas[j]["label_index"] for j in order]),
                          "has_audio": torch.tensor([metas[j]["has_audio"] for j in order]),
                          "start": torch.tensor([int(drawn["start"][j]) for j in order]),
                          "key": torch.from_numpy(np.stack([drawn["key"][j] for j in order]))})
        if loader.feed_stream is None:
            return frames, list(audio)
        with torch.cuda.stream(loader.feed_stream):
            for r in results:
                if r.marker is not None:
                    loader.feed_stream.wait_event(r.marker)
            audio = torch.from_numpy(audio).pin_memory().to(loader.gpu, non_blocking=True)  # one copy a batch
        return frames, list(audio)

    def _stand_ins(self, b: int, results, drawn) -> list[int]:
        """Which clip fills each place of the batch: itself, or for one that failed, the nearest
        clip of the batch that did not (named and counted)."""
        good = [r.index for r in results if r.error is None]
        failed = [r for r in results if r.error is not None]
        if failed and not good:
            raise RuntimeError(f"every clip of batch {b} failed to decode: " +
                               "; ".join(f"{parse_source_info(drawn['key'][r.index])[2]}: {r.error}" for r in failed))
        loader = self.loader
        for r in failed:
            tar, offset, key = parse_source_info(drawn["key"][r.index])
            record = {"shard": Path(tar).name, "key": key, "offset": offset, "reason": r.error, "epoch": self.epoch,
                      "batch": b, "rank": loader.rank}
            print(f"[stica.loader] rank {loader.rank}: {record['shard']} sample {key} cannot be decoded "
                  f"({r.error}); a valid clip of its batch stands in for it, and from the next epoch on a valid "
                  "sample of its shard", flush=True)
            loader.add_bad_sample(record)
            loader.new_bad_samples.append(record)
        return [i if results[i].error is None else min(good, key=lambda g: (abs(g - i), g))
                for i in range(len(results))]


class _Epoch:
    """What DaliLoader iterates: [batch dict] per batch, `skip` placeholders first (the batches a
    resumed epoch has already trained on, which _Feed skipped without decoding)."""

    def __init__(self, pipe, feed: _Feed, video_names: list[str], batches: int, skip: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.feed, self.batches, self.skip = feed, batches, skip
        self.iterator = DALIGenericIterator([pipe], video_names + ["audio"]) if pipe else iter(())

    def __len__(self):
        return self.batches

    def __iter__(self):
        return self

    def __next__(self):
        if self.skip:
            self.skip -= 1
            return [None]
        (batch,) = next(self.iterator)
        batch.update(self.feed.meta.popleft())
        return [batch]
