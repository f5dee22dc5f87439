"""DALI pipelines -> PyTorch: iterators yielding dicts of torch tensors, one pipeline per rank."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

import torch
from nvidia.dali import types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from stica.pipelines.clips import parse_source_info
from stica.shards import load_manifest, shard_paths


# Smallest frame NVDEC decodes, per codec (NVIDIA's NVDEC application note lists minimum sizes;
# VP9's is 128x128). `stica-bench --gpu-check` probes the real limit on the GPU at hand.
NVDEC_MIN_SIDE = {"vp9": 128, "h264": 48}
MODES = ("auto", "cpu", "hybrid", "mixed", "nvdec")


def resolve_device(name: str, codec: str, short_side: int, shards="shards", measured: str | None = None) -> str:
    """Where clips are decoded and augmented: cpu (both on the CPU), hybrid (CPU decode, GPU
    augmentation and spectrogram), mixed (DALI's NVDEC decode, GPU augmentation) or nvdec
    (long-lived NVDEC sessions, pipelines/nvdec.py, then the same GPU augmentation).

    auto: cpu without a GPU; mixed for H.264 (DALI's CPU decoder cannot read it); hybrid for
    VP9. At the default 128-px short side a 30-frame VP9 clip costs a CPU core about 7 ms
    (research/dali.md), so 150 clips/s take about one core, while NVDEC pays a per-call set-up
    and peers measure CPU decoding faster on small frames (torchcodec: 86 vs 15 frames/s at
    540p). `stica-bench --gpu-check` measures the modes side by side on the GPU at hand; auto picks
    nvdec only where such a report (data.gpu_check) found it the fastest on this GPU: `measured`.
    """
    if name not in MODES:
        raise ValueError(f"data.device must be one of {', '.join(MODES)}, not {name!r}")
    gpu = torch.cuda.is_available()
    if name == "auto":
        name = "cpu" if not gpu else "nvdec" if measured == "nvdec" else "mixed" if codec == "h264" else "hybrid"
    if name != "cpu" and not gpu:
        raise ValueError(f"data.device={name} needs a GPU and none is visible; use data.device=cpu")
    if codec != "vp9" and name not in ("mixed", "nvdec"):
        raise ValueError(f"{shards}: {codec} shards decode only on the GPU (data.device=mixed or nvdec); DALI's "
                         "CPU decoder takes VP8, VP9 and MJPEG (repack with --codec vp9 for CPU decoding)")
    if name in ("mixed", "nvdec") and short_side < NVDEC_MIN_SIDE[codec]:
        raise ValueError(f"{shards}: packed at short side {short_side}, below NVDEC's {NVDEC_MIN_SIDE[codec]}-px "
                         f"minimum for {codec}; repack with --short-side {NVDEC_MIN_SIDE[codec]} (the default 128) "
                         "or decode on the CPU (data.device=hybrid or cpu)")
    return name


def measured_fastest(report: str | None, codec: str) -> str | None:
    """The fastest loader mode a `stica-bench --gpu-check` report (its results.json) measured on
    this machine's GPU for shards of `codec`, or None (no report, or another GPU)."""
    if not report or not torch.cuda.is_available():
        return None
    import json

    results = json.loads(Path(report).read_text())
    if results["header"]["device"] != torch.cuda.get_device_name():
        return None
    return results.get("fastest_mode", {}).get(codec)


def keys_from_source_info(raw: torch.Tensor) -> list[str]:
    """read_shards' key output, a batch of it -> the sample keys."""
    return [parse_source_info(row)[2] for row in raw.cpu().numpy()]


class DaliLoader:
    """Iterates one epoch per `iter()`; every rank yields len(self) batches (the reader pads
    its shard to the longest one and incomplete batches are dropped), so DDP ranks stay in step.

    Each epoch gets a pipeline of its own, seeded by (seed, rank, epoch) and reading shard
    (rank + epoch) % world, so data rotates across ranks between epochs and any epoch can be
    rebuilt exactly. DALI 2.4 cannot checkpoint fn.decoders.video, so resuming mid-epoch
    replays that epoch's first batches through the loader (no model work) and drops them.
    """

    def __init__(self, cfg, rank: int = 0, world: int = 1, local_rank: int = 0, kind: str = "pretrain",
                 state: dict | None = None, bad_samples: list[dict] = (), device: str | None = None):
        from stica.pipelines.damaged import Substitutes

        self.cfg, self.rank, self.world, self.local_rank, self.kind = cfg, rank, world, local_rank, kind
        self.opts = load_manifest(cfg.shards)["options"]
        self.device = device or resolve_device(cfg.device, self.opts["codec"], self.opts["short_side"], cfg.shards)
        self.video_names = [f"view{i}" for i in range(cfg.views)] if kind == "pretrain" else ["video"]
        self.epoch, self.batch = (state["epoch"], state["batch"]) if state else (0, 0)
        self.substitutes, self.bad_samples, self.new_bad_samples = Substitutes(), [], []
        for record in bad_samples:
            self.add_bad_sample(record)
        self._next = self._open(self.epoch)
        self._length = len(self._next)

    def _reader(self, epoch: int) -> dict:
        """What an epoch's reader reads and how it draws: the same for its training pipeline and
        for the reader-only replay that finds a damaged sample."""
        tars, idxs = shard_paths(self.cfg.shards, self.cfg.split)
        seed = (self.cfg.seed + 7919 * self.rank + 104729 * epoch) % 2**31
        pretrain = self.kind == "pretrain"
        return {"tars": tars, "idxs": self.substitutes.index_paths(tars, idxs),
                "shard_id": (self.rank + epoch) % self.world if pretrain else self.rank, "seed": seed,
                # as pipelines/pretrain.py's draw and pipelines/evaluation.py's reader read
                "shuffle": pretrain, "shuffle_buffer": self.cfg.shuffle_buffer if pretrain else 1,
                "read_seed": seed if pretrain else 0}

    def _build(self, epoch: int):
        cfg = self.cfg
        reader = self._reader(epoch)
        common = dict(batch_size=cfg.batch_size, num_threads=cfg.threads, prefetch_queue_depth=cfg.prefetch,
                      device_id=self.local_rank if self.device != "cpu" else None, exec_dynamic=True,
                      seed=reader["seed"])
        args = (reader["tars"], reader["idxs"], cfg, self.opts["seg_frames"], self.opts["fps"])
        if self.kind == "pretrain":
            from stica.pipelines.pretrain import pretrain_pipeline

            pipe = pretrain_pipeline(*args, reader["shard_id"], self.world, self.device, reader["seed"], **common)
        else:
            from stica.pipelines.evaluation import eval_pipeline

            pipe = eval_pipeline(*args, reader["shard_id"], self.world, self.device, **common)
        pipe.build()
        names = self.video_names + ["audio", "label", "has_audio", "start", "key"]
        # Training drops the incomplete last batch (equal step counts on every rank); evaluation
        # keeps every video once (PARTIAL leaves out the reader's padding duplicates).
        policy = LastBatchPolicy.DROP if self.kind == "pretrain" else LastBatchPolicy.PARTIAL
        return EpochIterator(pipe, names, policy)

    def __len__(self) -> int:
        return self._length

    def state_dict(self) -> dict:
        """Where the next batch comes from: a loader built with this state continues exactly."""
        if self.batch >= len(self):  # the epoch's last batch was taken: the next one starts a new epoch
            return {"epoch": self.epoch + 1, "batch": 0}
        return {"epoch": self.epoch, "batch": self.batch}

    def __iter__(self):
        iterator, self._next = self._next, None
        skip, position = self.batch, 0
        while True:
            iterator = iterator or self._open(self.epoch)
            try:
                (batch,) = next(iterator)
            except StopIteration:
                break
            except RuntimeError as error:  # DALI lost the batch, and with it the pipeline
                iterator = None
                self._replace_damaged(position, error)
                skip, position = position, 0  # rebuilt, the epoch replays to the failed batch
                continue
            position += 1
            if position <= skip:
                continue
            self.batch = position
            out = {k: v for k, v in batch.items() if k not in self.video_names and k != "key"}
            out["video"] = [batch[k] for k in self.video_names]
            out["label"], out["has_audio"] = out["label"].long(), out["has_audio"].bool()
            out["key"] = keys_from_source_info(batch["key"])
            yield out
        if position != len(self):  # every rank must take as many steps as the others
            raise RuntimeError(f"rank {self.rank}: epoch {self.epoch} ended after {position} of {len(self)} batches")
        self.epoch, self.batch = self.epoch + 1, 0
        del iterator
        release_finished_pipeline()

    def _open(self, epoch: int):
        """The epoch's iterator. DALI runs the first batches as it builds one, so a damaged sample
        there fails the build: replace it and build again."""
        while True:
            try:
                return self._build(epoch)
            except RuntimeError as error:
                self._replace_damaged(0, error)

    def add_bad_sample(self, record: dict):
        """A sample no epoch of this loader reads again: a valid one of its shard stands in for it."""
        if any(r["shard"] == record["shard"] and r["key"] == record["key"] for r in self.bad_samples):
            return
        self.bad_samples.append(record)
        self.substitutes.add(str(Path(self.cfg.shards) / record["shard"]), record["offset"], record["key"])

    def _replace_damaged(self, position: int, error: RuntimeError):
        """Name the samples of batch `position` (or of the batches DALI had prefetched past it)
        that DALI cannot decode and have valid ones stand in for them (pipelines/damaged.py)."""
        from stica.pipelines.damaged import batch_members, probe

        reader = self._reader(self.epoch)
        found = []
        for batch in range(position, position + 1 + self.cfg.prefetch):  # an error may surface early
            members = batch_members(reader["tars"], reader["idxs"], self.cfg.batch_size, reader["shard_id"],
                                    self.world, reader["shuffle"], reader["shuffle_buffer"], reader["read_seed"],
                                    batch)
            for m in members:
                reason = probe(m, "cpu" if self.device in ("cpu", "hybrid") else "mixed", self.cfg.audio.rate, self.local_rank)
                if reason:
                    found.append({"shard": Path(m["tar"]).name, "key": m["key"], "offset": m["offset"],
                                  "reason": reason, "epoch": self.epoch, "batch": batch, "rank": self.rank})
            if found:
                break
        if not found:  # no sample is to blame: the error is DALI's or the machine's
            raise error
        for record in found:
            print(f"[stica.loader] rank {self.rank}: {record['shard']} sample {record['key']} cannot be decoded "
                  f"({record['reason']}); a valid sample of its shard stands in for it from now on", flush=True)
            self.add_bad_sample(record)
            self.new_bad_samples.append(record)


class EpochIterator(DALIGenericIterator):
    """DALI's iterator over one epoch of a pipeline built for that epoch alone.

    DALI's own keeps `prefetch` runs queued past the epoch's last batch, for the epoch that would
    follow in the same pipeline. Every epoch here builds a pipeline of its own, so those runs
    were decoded and augmented for nothing: 2 of every 22 batches at the benchmarks' 80-clip
    epochs (batch 4, prefetch 2), 0.4% of a Kinetics epoch's ~470 batches a rank. This one
    schedules only the runs its epoch reads: its batches, plus the incomplete last one that
    DALI's DROP policy reads to find the epoch's end. It hooks DALI 2.4's iterator internals
    (`_schedule_runs`); tests/test_pipelines.py fails if a DALI release changes them."""

    def __init__(self, pipe, names: list[str], policy):
        self._scheduled = 0
        super().__init__([pipe], names, reader_name="reader", last_batch_policy=policy)

    def _schedule_runs(self, release_outputs=True):
        # First called from DALI's constructor (its first batch), once it knows the epoch's size.
        runs = len(self) + (len(self) * self.batch_size < self.size)
        if self._scheduled >= runs:
            if release_outputs:
                with self._pipes[0]._check_api_type_scope(types.PipelineAPIType.ITERATOR):
                    self._pipes[0].release_outputs()
            return
        self._scheduled += 1 if self._ever_scheduled else self._pipes[0].prefetch_queue_depth  # the first fills the queue
        super()._schedule_runs(release_outputs)


def release_finished_pipeline():
    """Give back what a finished epoch's pipeline held. The pipeline itself is freed when its
    iterator goes, but the Python graph that pipeline_def built for it (DataNodes and operator
    instances referring to each other, plus the classes made for its conditionals) is a
    reference cycle the collector reaches late, and DALI keeps freed buffers in its pools. What
    both free stays in glibc's heap arenas (each new pipeline's threads take their own) unless
    trimmed. Measured over 80 epochs of an 8-video set, resident MiB: without the trim, 390-610
    with one run drifting +5 MiB per epoch; with it, 345-395 and flat (+-0.1 MiB/epoch) in each
    run. Without the collection and ReleaseUnusedMemory, +11 MiB per epoch. About 50 ms an epoch."""
    from nvidia.dali.backend import ReleaseUnusedMemory

    gc.collect()
    ReleaseUnusedMemory()
    if _libc is not None:
        _libc.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_libc = _glibc()


def build_loader(cfg, rank: int = 0, world: int = 1, local_rank: int = 0, kind: str = "pretrain",
                 backend: str = "dali", workers: int = 2, state: dict | None = None, bad_samples: list[dict] = ()):
    """backend: 'dali' (the product), 'reference' (PyAV + torch in DataLoader workers),
    'torchcodec' or 'spdl' (the reference loader decoding with torchcodec or spdl-io); state: a loader.state_dict()
    to continue from (resuming a run); bad_samples: damaged samples found earlier, replaced from the start."""
    if backend == "dali":
        opts = load_manifest(cfg.shards)["options"]
        device = resolve_device(cfg.device, opts["codec"], opts["short_side"], cfg.shards,
                                measured_fastest(cfg.gpu_check, opts["codec"]))
        if device == "nvdec":
            if kind != "pretrain":
                raise ValueError("data.device=nvdec serves pretraining; evaluation decodes with data.device=hybrid "
                                 "or mixed")
            from stica.pipelines.nvdec import NvdecLoader

            return NvdecLoader(cfg, rank, world, local_rank, state=state, bad_samples=bad_samples)
        return DaliLoader(cfg, rank, world, local_rank, kind, state=state, bad_samples=bad_samples, device=device)
    if backend in ("reference", "torchcodec", "spdl"):
        from stica.pipelines.reference import ReferenceLoader

        decoder = "pyav" if backend == "reference" else backend
        return ReferenceLoader(cfg, rank, world, local_rank, kind, workers=workers, state=state, decoder=decoder,
                               bad_samples=bad_samples)
    raise ValueError(f"loader backend must be dali, reference, torchcodec or spdl, not {backend!r}")
