"""DALI pipelines -> PyTorch: iterators yielding dicts of torch tensors, one pipeline per rank."""
from __future__ import annotations

import numpy as np
import torch

from stica.shards import load_manifest, shard_paths


def resolve_device(name: str) -> str:
    if name == "auto":
        return "mixed" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "mixed"):
        raise ValueError(f"data.device must be auto, cpu or mixed, not {name!r}")
    return name


def keys_from_source_info(raw: torch.Tensor) -> list[str]:
    """'path/to/shard.tar:offset:KEY.segs' (zero-padded bytes) -> KEY."""
    out = []
    for row in raw.cpu().numpy().astype(np.uint8):
        text = row.tobytes().rstrip(b"\0").decode()
        out.append(text.rsplit(":", 1)[-1].split(".", 1)[0])
    return out


class DaliLoader:
    """Iterates one epoch per `iter()`; every rank yields len(self) batches (the reader pads
    its shard to the longest one and incomplete batches are dropped), so DDP ranks stay in step."""

    def __init__(self, cfg, rank: int = 0, world: int = 1, local_rank: int = 0, kind: str = "pretrain"):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        opts = load_manifest(cfg.shards)["options"]
        codec = opts["codec"]
        self.device = resolve_device(cfg.device)
        if self.device == "cpu" and codec != "vp9":
            raise ValueError(f"{cfg.shards}: {codec} shards decode only on the GPU (data.device=mixed); "
                             "DALI's CPU decoder takes VP8, VP9 and MJPEG")
        tars, idxs = shard_paths(cfg.shards, cfg.split)
        common = dict(batch_size=cfg.batch_size, num_threads=cfg.threads, prefetch_queue_depth=cfg.prefetch,
                      device_id=local_rank if self.device == "mixed" else None, seed=cfg.seed + 7919 * rank,
                      exec_dynamic=True)
        if kind == "pretrain":
            from stica.pipelines.pretrain import pretrain_pipeline

            pipe = pretrain_pipeline(tars, idxs, cfg, opts["seg_frames"], opts["fps"], rank, world, self.device,
                                     **common)
            self.video_names = [f"view{i}" for i in range(cfg.views)]
            names = self.video_names + ["audio", "label", "has_audio", "start", "key"]
        else:
            from stica.pipelines.evaluation import eval_pipeline

            pipe = eval_pipeline(tars, idxs, cfg, opts["seg_frames"], opts["fps"], rank, world, self.device,
                                 **common)
            self.video_names = ["video"]
            names = ["video", "audio", "label", "has_audio", "start", "key"]
        pipe.build()
        # Training drops the incomplete last batch (equal step counts on every rank); evaluation
        # keeps every video once (PARTIAL leaves out the reader's padding duplicates).
        policy = LastBatchPolicy.DROP if kind == "pretrain" else LastBatchPolicy.PARTIAL
        self._it = DALIGenericIterator([pipe], names, reader_name="reader", auto_reset=True,
                                       last_batch_policy=policy)

    def __len__(self) -> int:
        return len(self._it)

    def __iter__(self):
        for (batch,) in self._it:
            out = {k: v for k, v in batch.items() if k not in self.video_names and k != "key"}
            out["video"] = [batch[k] for k in self.video_names]
            out["label"], out["has_audio"] = out["label"].long(), out["has_audio"].bool()
            out["key"] = keys_from_source_info(batch["key"])
            yield out


def build_loader(cfg, rank: int = 0, world: int = 1, local_rank: int = 0, kind: str = "pretrain",
                 backend: str = "dali", workers: int = 2):
    """backend: 'dali' (the product) or 'reference' (PyAV + torch in DataLoader workers)."""
    if backend == "dali":
        return DaliLoader(cfg, rank, world, local_rank, kind)
    if backend == "reference":
        from stica.pipelines.reference import ReferenceLoader

        return ReferenceLoader(cfg, rank, world, local_rank, kind, workers=workers)
    raise ValueError(f"loader backend must be dali or reference, not {backend!r}")
