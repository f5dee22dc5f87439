"""STiCA pretraining.

    torchrun --nproc_per_node=8 -m stica.train --config configs/pretrain_kinetics.yaml [key=value ...]

Reads top to bottom: data, model, loss, optimiser, resume, loop. Rerunning the same command
resumes from the run directory's checkpoint at the same step, schedule and data position.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from stica import checkpoint, distributed
from stica.config import HelpFormatter, load_config, save_config
from stica.batchnorm import convert_sync_batchnorm, sync_group
from stica.crops import crop_layout, sample_crops, windows
from stica.heartbeat import Heartbeat
from stica.losses import Keys, stica_terms
from stica.model import Stica, feature_grid


def learning_rate(step: int, cfg, peak: float, steps_per_epoch: int) -> float:
    """Per-iteration linear warm-up, then constant (as released) or cosine."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return peak * (cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / warmup)
    if cfg.schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, cfg.epochs * steps_per_epoch - warmup)
    return peak * (cfg.final_factor + (1 - cfg.final_factor) * 0.5 * (1 + math.cos(math.pi * progress)))


def stica_loss(model, batch, cfg, terms, rng, device, channels_last: bool):
    """Eq. (7): weight_va * L_va + weight_vv * L_vv, with L_vv over the two views' feature crops.
    Every embedding of the step is gathered across ranks once (losses.Keys), and every NCE term
    computed in one batched call (`terms`, losses.stica_terms)."""
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    views = [v.to(device, non_blocking=True).contiguous(memory_format=fmt) for v in batch["video"]]
    spec = batch["audio"].to(device, non_blocking=True)
    pooling = None
    if len(views) == 2:
        grid = feature_grid(*views[0].shape[2:])
        crops = [sample_crops(cfg.crops, grid, rng) for _ in views]
        pooling = tuple(t.to(device, non_blocking=True) for t in windows(crops, grid))
    out = model(views, spec, pooling)
    losses = terms(Keys.of_step(out, batch["has_audio"].to(device, non_blocking=True)))
    loss = sum(cfg.loss[f"weight_{name.removeprefix('l_')}"] * value for name, value in losses.items())
    return loss, losses


def sync_batchnorm(model: Stica, train_cfg, dist):
    """train.sync_bn: `all` BN layers (as released), the two `heads`' only, or `none` share their
    statistics over train.sync_bn_group; each synced call is one all_reduce forward and one
    backward, and none is a host sync (stica.batchnorm)."""
    if train_cfg.sync_bn not in ("all", "heads", "none"):
        raise ValueError(f"train.sync_bn={train_cfg.sync_bn!r}: all | heads | none")
    if train_cfg.sync_bn != "none" and dist.world > 1:
        group = sync_group(train_cfg.sync_bn_group, dist.world, dist.local_world)
        for part in [model] if train_cfg.sync_bn == "all" else [model.video_head, model.audio_head]:
            convert_sync_batchnorm(part, group)


def compile_regions(model: Stica, terms, regions: str, mode: str):
    """train.compile: `trunks` (the video and audio trunks), `heads` (the region after the trunks:
    crop windows, temporal pooling, heads, and the NCE terms), `all` (both) or `none`. Regions,
    not the DDP wrapper: DDP splits a compiled whole at its gradient buckets, and the crop
    positions are tensor values, so one graph serves every step. Module.compile keeps the
    state_dict keys. `mode` is torch.compile's (reduce-overhead: CUDA graphs of each region)."""
    if regions not in ("none", "trunks", "heads", "all"):
        raise ValueError(f"train.compile={regions!r}: none | trunks | heads | all")
    if regions in ("trunks", "all"):
        model.video.compile(mode=mode)
        model.audio.compile(mode=mode)
    if regions in ("heads", "all"):
        model.embed_maps = torch.compile(model.embed_maps, mode=mode)
        terms.per_term = torch.compile(terms.per_term, mode=mode)


def make_optimizer(params, optim_cfg, lr, device, amp_dtype):
    """SGD, fused on the GPU except under fp16: the fused kernel takes the grad scaler's inf check
    on the device (no host sync), but on a step the scaler skips it still writes the momentum
    buffers (uninitialised ones on the first step), and the next step blows the weights up. fp16
    runs the unfused kernel, whose skip is a host sync; bf16 (the default) needs no scaler."""
    fused = device.type == "cuda" and amp_dtype != torch.float16
    return torch.optim.SGD(params, lr=lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay,
                           fused=fused or None)


def train_step(model, batch, cfg, terms, rng, device, channels_last, amp_dtype, optimizer, scaler):
    """Forward, backward and update with no host-device synchronisation: the loss and its terms
    come back as device tensors, read on the log cadence."""
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss, losses = stica_loss(model, batch, cfg, terms, rng, device, channels_last)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # a fused optimizer takes the scaler's inf check on the device
    scaler.update()
    return loss.detach(), {k: v.detach() for k, v in losses.items()}


class StopRequest:
    """SIGTERM / SIGUSR1 (a scheduler's notice) ask for a checkpoint at the end of the current step."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stica.train", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML config under configs/ (pretrain_kinetics.yaml, demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.batch_size=16")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dist = distributed.setup(cfg.train.backend, cfg.comm.init_timeout_s, run_dir / "comm_traces")
    if dist.main:
        save_config(cfg, run_dir / "config.yaml")
    with Heartbeat(run_dir, dist.rank, dist.world, cfg.comm.heartbeat_s) as heartbeat:
        train(cfg, dist, run_dir, heartbeat)


def train(cfg, dist, run_dir: Path, heartbeat: Heartbeat):
    torch.manual_seed(cfg.run.seed + dist.rank)
    np.random.seed(cfg.run.seed + dist.rank)
    gpu = dist.device.type == "cuda"
    if cfg.train.deterministic:
        # Two runs of the same command on one H100 part at the first loss by 1% and after a few steps
        # by 20%: the autotuner picks kernels by timing, and their summation orders differ at bf16's
        # precision. Deterministic kernels make a GPU run (and its resume) repeat itself; ops without
        # one warn rather than stop the run.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif gpu:
        torch.backends.cudnn.benchmark = True  # fixed clip shapes: pick the fastest kernels once
    log = Logger(run_dir, dist.main)
    # Rank 0 reads the checkpoint and hands it to every rank: a node that cannot see the run
    # directory must not start from random weights.
    resume = distributed.broadcast_object(checkpoint.load_latest(run_dir, "cpu") if dist.main else None)
    loader_state = resume["loader"] if resume else None
    if resume and resume.get("world", dist.world) != dist.world:
        loader_state = checkpoint.rescale_position(resume, dist.world)

    # Data
    from stica.pipelines.loader import build_loader  # here: the model-only benchmarks import this module without DALI

    loader = build_loader(cfg.data, dist.rank, dist.world, dist.local_rank, backend=cfg.data.loader,
                          workers=cfg.data.workers, state=loader_state,
                          bad_samples=resume.get("bad_samples", []) if resume else [])
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise SystemExit(f"{cfg.data.shards}: fewer samples per rank than data.batch_size={cfg.data.batch_size}")
    total_steps = cfg.optim.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    global_batch = cfg.data.batch_size * dist.world

    # Model
    model = Stica(cfg.model)
    if resume:  # before the DDP wrap, whose constructor broadcasts rank 0's weights anyway
        model.load_state_dict(resume["model"])
    sync_batchnorm(model, cfg.train, dist)
    model = model.to(dist.device)
    channels_last = cfg.train.channels_last
    if channels_last:  # the video trunk only: the audio trunk is 2-D
        model.video.to(memory_format=torch.channels_last_3d)
    terms = stica_terms(cfg.loss, cfg.data.views, crop_layout(cfg.crops, feature_grid(
        cfg.data.num_frames, cfg.data.crop_size, cfg.data.crop_size)), dist.device)
    compile_regions(model, terms, cfg.train.compile, cfg.train.compile_mode)
    distributed.set_timeout(cfg.comm.init_timeout_s)  # the BN subgroups were made with torch's default
    core = model
    if dist.world > 1:
        # No buffer broadcast: BN's running statistics serve only evaluation, which reads rank 0's
        # checkpoint, and a broadcast would be one more collective at every forward.
        model = DistributedDataParallel(model, device_ids=[dist.local_rank] if gpu else None,
                                        gradient_as_bucket_view=True, **distributed.NO_BUFFER_SYNC)

    # Optimiser (lr scaled by the global batch)
    peak_lr = cfg.optim.base_lr * global_batch / cfg.optim.base_batch
    amp_dtype = distributed.amp_dtype(cfg.train.amp, dist.device, cfg.train.cpu_bf16)
    if cfg.train.cpu_bf16 and not gpu and amp_dtype is None:
        log.info("train.cpu_bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); training in fp32")
    optimizer = make_optimizer(core.parameters(), cfg.optim, peak_lr, dist.device, amp_dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    # Resume
    step = 0
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        if resume.get("world", dist.world) == dist.world:
            checkpoint.set_rng_state(resume["rng"][dist.rank])
            step = resume["step"]
        else:  # a new world size: the schedule continues from the epoch boundary (samples seen)
            step = loader.epoch * steps_per_epoch
        log.info(f"resumed from {run_dir / checkpoint.LATEST} at step {step} (epoch {loader.epoch}, "
                 f"batch {loader.batch}, {resume.get('world', dist.world)} -> {dist.world} process(es))")
    log.info(f"{dist.world} process(es) on {dist.device.type}, global batch {global_batch}, {steps_per_epoch} "
             f"steps/epoch, peak lr {peak_lr:.4g}, {sum(p.numel() for p in core.parameters()) / 1e6:.2f}M params")

    saved = first_step = step
    heartbeat.advance(step)
    stop = StopRequest()
    meter = Meter(dist.device)

    def check_health():
        """The one host sync of a log window: every rank learns whether any rank saw a
        non-finite loss or a stop request since the last check. Checked before every save,
        so a checkpoint never holds weights updated by a non-finite loss. Damaged samples a rank
        found since (named and replaced by its loader) go to every rank, so no rank trips on
        them in a later epoch, and into bad_samples.jsonl."""
        found = getattr(loader, "new_bad_samples", [])
        bad_step, stopping, news = distributed.any_rank(meter.first_bad, stop.signal is not None, dist.device,
                                                        len(found))
        if news:
            records = [r for rank in distributed.gather_objects(list(found)) for r in rank]
            found.clear()
            for record in records:
                loader.add_bad_sample(record)
            if dist.main:
                with open(run_dir / "bad_samples.jsonl", "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
                log.info(f"{len(records)} damaged sample(s) replaced: {', '.join(r['key'] for r in records)} "
                         f"(see {run_dir / 'bad_samples.jsonl'})")
        if bad_step:
            log.info(f"non-finite loss at step {bad_step} (window means: {meter.means()}); stopping. The last "
                     f"good checkpoint ({run_dir / checkpoint.LATEST}, step {saved}) is kept: lower "
                     f"optim.base_lr or check the data.")
            distributed.teardown()
            sys.exit(2)
        return stopping

    def save(keep_as=None):
        nonlocal saved
        saved = step
        rng = distributed.gather_objects(checkpoint.rng_state())
        if dist.main:
            checkpoint.save(run_dir, {"model": core.state_dict(), "optimizer": optimizer.state_dict(),
                                      "scaler": scaler.state_dict(), "step": step, "loader": loader.state_dict(),
                                      "world": dist.world, "samples_seen": step * global_batch,
                                      "bad_samples": getattr(loader, "bad_samples", []),
                                      "rng": rng, "config": OmegaConf.to_container(cfg, resolve=True)}, keep_as)

    # Loop
    model.train()
    while step < total_steps:
        t_wait = time.perf_counter()
        for batch in loader:
            t_got = time.perf_counter()
            lr = learning_rate(step, cfg.optim, peak_lr, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rng = np.random.default_rng((cfg.run.seed * 1_000_003 + step) * dist.world + dist.rank)
            loss, losses = train_step(model, batch, cfg, terms, rng, dist.device, channels_last, amp_dtype,
                                      optimizer, scaler)
            step += 1
            heartbeat.advance(step)
            if step == first_step + 1:  # start-up is over: a rank that stops from here on ends the job soon
                distributed.set_timeout(cfg.comm.train_timeout_s)
            meter.add(step, t_got - t_wait, time.perf_counter() - t_wait, loss, losses)
            last = step >= total_steps
            if step % cfg.train.log_every == 0 or step % cfg.train.ckpt_every == 0 or last:
                stopping = check_health()
                if step % cfg.train.log_every == 0 or last:
                    log.step(step, total_steps, loader.epoch, lr, meter, global_batch, dist.device,
                             len(getattr(loader, "bad_samples", [])))
                if stopping:  # a scheduler's notice: save this step, then leave
                    save()
                    log.info(f"{stop.signal or 'stop request on another rank'}: saved step {step}; rerun the "
                             f"same command to resume")
                    distributed.teardown()
                    return
                if step % cfg.train.ckpt_every == 0:
                    save()
            if last:
                break
            t_wait = time.perf_counter()
        if loader.batch == 0:  # an epoch ended
            check_health()
            keep = loader.epoch % cfg.train.keep_every_epochs == 0 or step >= total_steps
            save(f"epoch-{loader.epoch:03d}.pt" if keep else None)
    if saved != step:
        check_health()
        save()
    log.info(f"done: {step} steps; checkpoint {run_dir / checkpoint.LATEST}, log {run_dir / 'log.jsonl'}")
    if dist.main:
        from stica.plots import plot_loss

        plot_loss(run_dir / "log.jsonl", run_dir / "loss.png")
    distributed.teardown()


class Meter:
    """Sums over the current log window; losses stay on the device until the window is read."""

    def __init__(self, device):
        self.device = device
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # first non-finite step, 0 if none
        self.reset()

    def reset(self):
        self.steps, self.wait, self.total, self.start = 0, 0.0, 0.0, time.perf_counter()
        self.sums = None

    def add(self, step, wait, total, loss, terms):
        self.steps += 1
        self.wait += wait
        self.total += total
        values = torch.stack([loss, *terms.values()]).float()
        self.names = ["loss", *terms]
        self.sums = values if self.sums is None else self.sums + values
        bad = ~torch.isfinite(loss)
        self.first_bad = torch.where(bad & (self.first_bad == 0), step, self.first_bad)

    def means(self) -> dict:
        return {k: v / self.steps for k, v in zip(self.names, self.sums.tolist())}


class Logger:
    """Rank 0 prints a line per log window (rate, data wait, ETA) and appends it to log.jsonl."""

    def __init__(self, run_dir: Path, main: bool):
        self.path, self.main = run_dir / "log.jsonl", main
        self.t0 = time.perf_counter()

    def info(self, text: str):
        if self.main:
            print(f"[stica.train] {text}", flush=True)

    def step(self, step, total, epoch, lr, m: Meter, global_batch, device, bad_samples: int = 0):
        if not self.main:
            m.reset()
            return
        elapsed = time.perf_counter() - m.start
        rate = m.steps * global_batch / elapsed
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        means = m.means()
        record = {"step": step, "epoch": epoch, **means, "lr": lr, "clips_per_s": rate,
                  "data_wait_pct": 100 * m.wait / max(m.total, 1e-9), "gpu_mem_gib": memory,
                  "bad_samples": bad_samples, "time": time.time()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        eta = (total - step) * elapsed / m.steps
        terms = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "loss")
        mem = f" mem {memory:.1f}G" if memory is not None else ""
        print(f"[stica.train] step {step}/{total} ep {epoch} loss {record['loss']:.4f} ({terms}) lr {lr:.4g} "
              f"{rate:.1f} clips/s data-wait {record['data_wait_pct']:.0f}%{mem} eta {eta / 60:.1f} min", flush=True)
        m.reset()


if __name__ == "__main__":
    main()
