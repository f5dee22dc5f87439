"""The conventional loader: PyAV decoding and torch augmentations in DataLoader worker
processes, behind the same interface as DaliLoader. It is the baseline every throughput
figure is compared with, and the fallback where DALI is not installed. With decoder="torchcodec"
(`data.loader=torchcodec`) the same loader decodes with torchcodec instead of PyAV: the peer
users pick today, benchmarked beside the other two; decoder="spdl" (`data.loader=spdl`) decodes
with spdl-io, the decoding library of Meta's SPDL, the loader built for this problem.

Samples are read by the shards' index files (random access into the tars, as webdataset's
`wids` does) rather than by streaming whole shards, so a DistributedSampler can give every
rank the same number of batches and each sample once; decoding touches only the segments a
clip needs and stops at its last frame, as in the DALI graph, so the comparison is between
decode-and-augment engines.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from stica.media import decode_flac, decoder_missing, segment_frames
from stica.shards import (audio_segment_samples, clip_segments, load_manifest, parse_info, read_index, read_members,
                          shard_paths, split_audio)


def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)


def mel_filters(n_mels: int, nfft: int, rate: int) -> torch.Tensor:
    """Triangular HTK-mel filters evaluated at the FFT bin frequencies, unnormalised (what
    DALI's mel_filter_bank(mel_formula='htk', normalize=False) computes)."""
    edges = 700.0 * (10 ** (np.linspace(0, hz_to_mel(rate / 2), n_mels + 2) / 2595.0) - 1.0)
    freqs = np.arange(nfft // 2 + 1) * rate / nfft
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up, down = (freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)
    return torch.from_numpy(np.clip(np.minimum(up, down), 0, None)).float()


def log_mel(audio: torch.Tensor, cfg, filters: torch.Tensor) -> torch.Tensor:
    """The torch twin of pipelines.clips.log_mel: 1 x n_mels x frames."""
    win, hop = round(cfg.win_seconds * cfg.rate), round(cfg.hop_seconds * cfg.rate)
    if cfg.preemphasis:
        audio = torch.cat([audio[:1], audio[1:] - cfg.preemphasis * audio[:-1]])
    frames = audio.unfold(0, win, hop)
    window = torch.ones(win) if cfg.window == "rect" else torch.hann_window(win)
    power = torch.fft.rfft(frames * window, n=cfg.nfft).abs() ** 2 / cfg.nfft
    mel = filters @ power.T
    return torch.log(mel.clamp_min(np.finfo(np.float64).eps))[None]


def random_resized_box(rng, height, width, scale, ratio):
    """A crop box of random area share and aspect ratio, inside the frame (10 tries, then centre)."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """x: T,C,H,W. Separable blur with reflected borders."""
    t = torch.arange(kernel, dtype=torch.float32) - kernel // 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, [kernel // 2] * 4, mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])


def rotate_hue(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """x: T,3,H,W. Turns the chroma plane (I, Q) of YIQ by `degrees`, keeping luma, as DALI's
    color_twist(hue=degrees) does (its turn runs from Q towards I)."""
    a = math.radians(degrees)
    turn = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(a), math.sin(a)], [0.0, -math.sin(a), math.cos(a)]])
    m = torch.linalg.inv(RGB_TO_YIQ) @ turn @ RGB_TO_YIQ
    return torch.einsum("ij,tjhw->tihw", m.to(x.dtype), x)


def normalize(x: torch.Tensor, cfg) -> torch.Tensor:
    """T,C,H,W pixel levels -> (x - mean) / std with the config's [0, 1]-scale statistics."""
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.std).view(1, 3, 1, 1) * 255
    return (x - mean) / std


def video_view(frames: torch.Tensor, cfg, rng) -> torch.Tensor:
    """frames: T,H,W,3 uint8 -> 3,T,S,S float, one random draw per clip (as in the DALI graph)."""
    x = frames.permute(0, 3, 1, 2).float()
    top, left, h, w = random_resized_box(rng, x.shape[2], x.shape[3], cfg.crop_scale, cfg.crop_ratio)
    x = F.interpolate(x[:, :, top:top + h, left:left + w], size=(cfg.crop_size,) * 2, mode="bilinear",
                      align_corners=False)
    if rng.random() < cfg.jitter_prob:
        b, c, s = (1 + rng.uniform(-a, a) for a in (cfg.brightness, cfg.contrast, cfg.saturation))
        x = x * b
        grey = grayscale(x).mean()  # the clip's mean grey, as the DALI graph
        x = (x - grey) * c + grey
        grey = grayscale(x)
        x = (x - grey) * s + grey
        if cfg.hue > 0:
            x = rotate_hue(x, rng.uniform(-cfg.hue, cfg.hue))
    if rng.random() < cfg.grayscale_prob:
        x = grayscale(x).expand_as(x)
    x = x.clamp(0, 255)
    if rng.random() < cfg.blur_prob:
        sigma = rng.uniform(*cfg.blur_sigma)
        x = gaussian_blur(x, min(2 * math.ceil(3 * sigma) + 1, cfg.blur_kernel), sigma)  # as the DALI graph
    if rng.random() < cfg.flip_prob:
        x = x.flip(-1)
    return normalize(x, cfg).permute(1, 0, 2, 3).contiguous()


def decode_clip(segs: bytes, info: bytes, start: int, num_frames: int, decoder: str = "pyav") -> np.ndarray:
    meta, offsets = parse_info(info)
    frames = [segment_frames(segment, first, first + count, decoder)
              for segment, first, count in clip_segments(segs, meta, offsets, start, num_frames)]
    frames = np.concatenate(frames)
    return np.concatenate([frames, frames[-1:].repeat(num_frames - len(frames), 0)])  # edge padding, as DALI's


def audio_clip(flac: bytes, info: bytes, start: int, seconds: float, decoder: str = "pyav") -> torch.Tensor:
    """The clip's audio (float, packed rate), decoded from the audio segments it touches only."""
    meta, _ = parse_info(info)
    per = audio_segment_samples(meta["seg_frames"], meta["audio_rate"], meta["fps"])
    pieces = split_audio(flac, info)
    a0, n = round(start * meta["audio_rate"] / meta["fps"]), round(seconds * meta["audio_rate"])
    first, last = a0 // per, min((a0 + n - 1) // per, len(pieces) - 1)
    track = [decode_flac(pieces[k], decoder) for k in range(first, last + 1)]
    window = np.concatenate(track or [np.zeros(0, np.int16)])[a0 - first * per:][:n].astype(np.float32)
    return torch.from_numpy(np.pad(window, (0, n - len(window))))


class ShardSamples(Dataset):
    def __init__(self, cfg, kind: str, seed: int, decoder: str = "pyav"):
        self.cfg, self.kind, self.seed, self.decoder, self.epoch = cfg, kind, seed, decoder, 0
        self.fps = load_manifest(cfg.shards)["options"]["fps"]
        tars, idxs = shard_paths(cfg.shards, cfg.split)
        self.samples = [(tar, key, members) for tar, idx in zip(tars, idxs) for key, members in read_index(idx)]
        self.filters = mel_filters(cfg.audio.n_mels, cfg.audio.nfft, cfg.audio.rate)
        self.bad: dict[int, dict] = {}  # sample index -> its record: read by the workers each epoch forks
        self.shard_span = {}  # tar -> [first, last + 1) of its samples
        for j, (tar, _, _) in enumerate(self.samples):
            self.shard_span[tar] = (self.shard_span.get(tar, (j, j))[0], j + 1)

    def __len__(self):
        return len(self.samples)

    def _read(self, i):
        tar, key, members = self.samples[i]
        with open(tar, "rb") as f:
            return key, read_members(f, members)

    def __getitem__(self, i):
        """Sample i, or where it cannot be decoded the nearest one of its shard that can: the
        trainer's rule (pipelines/damaged.py), so a damaged sample costs its place, not the run.
        The damaged ones met travel with the sample (`damaged`) to the loader, which names them."""
        tar, found = self.samples[i][0], []
        for j in self._nearest_first(i):
            if j in self.bad:
                continue
            try:
                out = self._sample(j, i)
            except Exception as e:  # PyAV's, torchcodec's or spdl-io's error, whichever decodes
                record = {"shard": Path(tar).name, "key": self.samples[j][1], "offset": self.samples[j][2]["segs"][0],
                          "reason": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}",
                          "epoch": self.epoch, "sample": j}
                self.bad[j] = record
                found.append(record)
                continue
            return {**out, "damaged": found}
        raise RuntimeError(f"{tar}: every sample is damaged; repack it (stica-shard verify names them)")

    def _nearest_first(self, i):
        """i, then the other samples of its shard by distance (a shard's samples are listed together)."""
        lo, hi = self.shard_span[self.samples[i][0]]
        yield i
        for d in range(1, hi - lo):
            yield from (j for j in (i + d, i - d) if lo <= j < hi)

    def _sample(self, j, i):
        """Sample j's clips, drawn as sample i's (a substitute takes the draws of the place it fills)."""
        key, m = self._read(j)
        meta, _ = parse_info(m["info"])
        cfg, T = self.cfg, self.cfg.num_frames
        rng = np.random.default_rng([self.seed, self.epoch, i])  # same draws whichever worker runs it
        span = max(0, meta["num_frames"] - T)
        if self.kind == "pretrain":
            starts = [int(rng.integers(0, span + 1))]
        else:
            starts = [int(span * c / max(1, cfg.eval_clips - 1)) for c in range(cfg.eval_clips)]
        clips = [torch.from_numpy(decode_clip(m["segs"], m["info"], s, T, self.decoder)) for s in starts]
        audio = [log_mel(audio_clip(m["flac"], m["info"], s, T / self.fps, self.decoder)
                         * (rng.uniform(*cfg.audio.volume_jitter) if self.kind == "pretrain" else 1.0),
                         cfg.audio, self.filters) for s in starts]
        out = {"label": meta["label_index"], "has_audio": bool(meta["has_audio"]), "key": key}
        if self.kind == "pretrain":
            out.update({f"view{v}": video_view(clips[0], cfg, rng) for v in range(cfg.views)})
            out.update(audio=audio[0], start=starts[0])
        else:
            out.update(video=torch.stack([c for clip in clips for c in eval_crops(clip, cfg)]),
                       audio=torch.stack(audio), start=torch.tensor(starts))
        return out


def eval_crops(frames: torch.Tensor, cfg) -> list[torch.Tensor]:
    x = frames.permute(0, 3, 1, 2).float()
    h, w = x.shape[2:]
    size = cfg.crop_size
    scale = size / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True,
                      align_corners=False)
    h, w = x.shape[2:]
    positions = [0.0, 0.5, 1.0] if cfg.eval_crops == 3 else [0.5]
    crops = []
    for p in positions:
        top, left = round((h - size) * p), round((w - size) * p)
        crops.append(normalize(x[:, :, top:top + size, left:left + size], cfg).permute(1, 0, 2, 3))
    return crops


class ReferenceLoader:
    def __init__(self, cfg, rank: int = 0, world: int = 1, local_rank: int = 0, kind: str = "pretrain",
                 workers: int = 2, state: dict | None = None, decoder: str = "pyav", bad_samples: list[dict] = ()):
        if decoder != "pyav" and (why := decoder_missing(decoder)):
            raise RuntimeError(f"data.loader={decoder}: {decoder} cannot run here ({why}); install it with "
                               "FFmpeg's shared libraries, or use data.loader=reference")
        self.dataset = ShardSamples(cfg, kind, seed=cfg.seed, decoder=decoder)
        self.kind, self.batch_size, self.workers = kind, cfg.batch_size, workers
        self.views = cfg.views if kind == "pretrain" else 1
        # Padding (drop_last=False) gives every rank the same sample count, as DALI's pad_last_batch.
        self.sampler = DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=kind == "pretrain",
                                          seed=cfg.seed, drop_last=False)
        self.epoch, self.batch = (state["epoch"], state["batch"]) if state else (0, 0)
        self.rank, self.bad_samples, self.new_bad_samples = rank, [], []
        for record in bad_samples:
            self.add_bad_sample(record)

    def add_bad_sample(self, record: dict):
        """A sample no later epoch decodes again: its shard's nearest valid one stands in for it."""
        if any(r["shard"] == record["shard"] and r["key"] == record["key"] for r in self.bad_samples):
            return
        self.bad_samples.append(record)
        for j, (tar, key, _) in enumerate(self.dataset.samples):
            if Path(tar).name == record["shard"] and key == record["key"]:
                self.dataset.bad[j] = record

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.kind == "pretrain" else -(-n // self.batch_size)

    def state_dict(self) -> dict:
        if self.batch >= len(self):  # the epoch's last batch was taken: the next one starts a new epoch
            return {"epoch": self.epoch + 1, "batch": 0}
        return {"epoch": self.epoch, "batch": self.batch}

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        self.dataset.epoch = self.epoch  # read by the workers forked below
        indices = list(self.sampler)[self.batch * self.batch_size:]  # resuming: skip without decoding
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=indices, num_workers=self.workers,
                            drop_last=self.kind == "pretrain", collate_fn=_collate)
        for batch in loader:
            self.batch += 1
            for record in (r for found in batch.pop("damaged") for r in found):
                record = {**record, "batch": self.batch - 1, "rank": self.rank}
                print(f"[stica.loader] rank {self.rank}: {record['shard']} sample {record['key']} cannot be decoded "
                      f"({record['reason']}); a valid sample of its shard stands in for it from now on", flush=True)
                self.add_bad_sample(record)
                self.new_bad_samples.append(record)
            if self.kind == "pretrain":
                batch["video"] = [batch.pop(f"view{v}") for v in range(self.views)]
            else:
                batch["video"] = [batch["video"]]
            yield batch
        self.epoch, self.batch = self.epoch + 1, 0


def _collate(samples):
    out = {}
    for k in samples[0]:
        values = [s[k] for s in samples]
        out[k] = values if k in ("key", "damaged") else torch.stack(values) if torch.is_tensor(values[0]) else torch.tensor(values)
    return out
