"""Downstream evaluation of a pretrained checkpoint (paper Sec. 4.3).

    python -m stica.eval retrieval    --config configs/eval_ucf101.yaml eval.checkpoint=runs/k400/checkpoint.pt
    python -m stica.eval linear       --config ...        # linear probe on frozen features
    torchrun --nproc_per_node=8 -m stica.eval finetune --config ...
    python -m stica.eval av-retrieval --config configs/demo.yaml eval.checkpoint=... data.split=val
    python -m stica.eval audio-linear --config ... eval.audio.dataset=esc50 eval.audio.root=/data/ESC-50

Shards come from `stica-shard pack --ucf101-splits/--hmdb51-splits`, with splits
foldN-train, foldN-val (held out of the training list, for model selection) and foldN-test;
the audio sets (ESC-50, DCASE2014) are read from their own files (stica/pipelines/audio.py).
Results go to eval.out as JSON and Markdown.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from stica import distributed
from stica.config import HelpFormatter, load_config
from stica.model import Stica, time_steps
from stica.pipelines.loader import build_loader


def load_model(cfg, checkpoint: str | None) -> Stica:
    """The pretrained model, or (checkpoint null) the same architecture at its initialisation."""
    torch.manual_seed(cfg.run.seed)
    model = Stica(cfg.model)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state.get("model", state))
    return model


def split_cfg(data_cfg, split: str, **changes):
    cfg = copy.deepcopy(data_cfg)
    cfg.split = split
    for k, v in changes.items():
        cfg[k] = v
    return cfg


def split_name(cfg, kind: str, fold: int) -> str:
    """Under eval.protocol=paper the training split is the whole official training list (the
    held-out part read back in), as the paper trains and retrieves; 'select' keeps it apart."""
    name = cfg.eval.splits[kind].format(fold=fold)
    if kind == "train" and cfg.eval.protocol == "paper":
        return f"{name}+{cfg.eval.splits.val.format(fold=fold)}"
    return name


def check_protocol(cfg):
    if cfg.eval.protocol not in ("select", "paper"):
        raise SystemExit(f"eval.protocol={cfg.eval.protocol!r}: 'select' or 'paper'")


def gather_by_key(rows: dict, dist) -> dict:
    """Every rank's {key: value}; the reader's padding duplicates collapse onto their key."""
    if dist.world == 1:
        return rows
    parts = [None] * dist.world
    tdist.all_gather_object(parts, rows)
    return {k: v for part in parts for k, v in part.items()}


def in_chunks(fn, x: torch.Tensor, cfg, device) -> torch.Tensor:
    """fn over the rows of x, eval.chunk rows per forward, under the trainer's autocast (train.amp on
    the GPU, train.cpu_bf16 on the CPU): 8 videos x 10 clips x 3 crops in one fp32 forward would
    peak at tens of GiB."""
    amp = distributed.amp_dtype(cfg.train.amp, device, cfg.train.cpu_bf16)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        return torch.cat([fn(part.to(device, non_blocking=True).float()).float() for part in x.split(cfg.eval.chunk)])


def note_damaged(loader, cfg, split: str, dist):
    """The damaged samples the loader met in `split`, named on the console and in
    eval.out/bad_samples.jsonl. The loader put a valid sample of the same shard in each one's
    place; that sample's key collapses onto its own row, so a damaged video is left out of the
    scores, and the results' video counts say how many were scored."""
    found = getattr(loader, "new_bad_samples", [])
    if not found:
        return
    out = Path(cfg.eval.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bad_samples.jsonl", "a") as f:
        f.writelines(json.dumps({**r, "split": split}) + "\n" for r in found)
    print(f"[stica.eval] rank {dist.rank}: {len(found)} damaged sample(s) in {split} left out of the scores: "
          f"{', '.join(r['key'] for r in found)} (see {out / 'bad_samples.jsonl'})", flush=True)
    found.clear()


def progress(name: str, i: int, total: int, t0: float):
    if i % 10 == 0 or i == total:
        rate = i / max(time.perf_counter() - t0, 1e-9)
        print(f"[stica.eval] {name}: {i}/{total} batches, {rate:.2f} batches/s, eta "
              f"{(total - i) / max(rate, 1e-9):.0f} s", flush=True)


@torch.no_grad()
def video_features(model: Stica, cfg, split: str, dist) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Per video: the trunk's last-block map of each of eval_clips uniform clips (centre crop),
    max-pooled, then averaged over the clips (the retrieval protocol the paper follows)."""
    model.eval().to(dist.device)
    loader = build_loader(split_cfg(cfg.data, split, eval_crops=1), dist.rank, dist.world, dist.local_rank,
                          kind="eval", backend=cfg.data.loader, workers=cfg.data.workers)
    rows, t0 = {}, time.perf_counter()
    for i, batch in enumerate(loader, 1):
        clips = batch["video"][0]
        B, N = clips.shape[:2]
        pooled = in_chunks(lambda x: model.video(x).amax(dim=(2, 3, 4)), clips.flatten(0, 1), cfg, dist.device)
        feats = pooled.view(B, N, -1).mean(dim=1).cpu()
        rows.update({k: (f, int(l)) for k, f, l in zip(batch["key"], feats, batch["label"])})
        progress(f"features {split}", i, len(loader), t0)
    note_damaged(loader, cfg, split, dist)
    rows = gather_by_key(rows, dist)
    keys = sorted(rows)
    return torch.stack([rows[k][0] for k in keys]), torch.tensor([rows[k][1] for k in keys]), keys


def hits_at_k(queries, query_labels, gallery, gallery_labels, k: int) -> torch.Tensor:
    """Per query: whether any of its k nearest gallery items (cosine) shares its class."""
    sim = F.normalize(queries, dim=1) @ F.normalize(gallery, dim=1).T
    order = sim.topk(k, dim=1).indices
    return (gallery_labels[order] == query_labels[:, None]).any(dim=1)


def recall_at_k(queries, query_labels, gallery, gallery_labels, ks=(1, 5, 20)) -> dict:
    return {f"R@{k}": hits_at_k(queries, query_labels, gallery, gallery_labels, k).float().mean().item()
            for k in ks if k <= gallery.shape[0]}


def retrieval(cfg, model, dist) -> dict:
    """Test videos query the training videos; under eval.protocol=paper on split 1 only (Table 5)."""
    results = {}
    for fold in [1] if cfg.eval.protocol == "paper" else cfg.eval.folds:
        train_f, train_y, _ = video_features(model, cfg, split_name(cfg, "train", fold), dist)
        test_f, test_y, _ = video_features(model, cfg, split_name(cfg, "test", fold), dist)
        results[f"fold{fold}"] = {**recall_at_k(test_f, test_y, train_f, train_y, cfg.eval.recall_at),
                                  "queries": len(test_y), "gallery": len(train_y)}
    results["mean"] = {k: sum(r[k] for r in results.values()) / len(results) for k in next(iter(results.values()))
                       if k.startswith("R@")}
    return results


@torch.no_grad()
def av_embeddings(cfg, model, dist) -> tuple[torch.Tensor, torch.Tensor]:
    """Video and audio embeddings (the pretraining heads) of the centre clip of each held-out
    pretraining video (data.split), in key order."""
    model.eval().to(dist.device)
    data = split_cfg(cfg.data, cfg.data.split, eval_clips=1, eval_crops=1)
    rows = {}
    loader = build_loader(data, dist.rank, dist.world, dist.local_rank, kind="eval", backend=data.loader,
                          workers=data.workers)
    for batch in loader:
        v = in_chunks(lambda x: model.embed_video(x), batch["video"][0][:, 0], cfg, dist.device)
        a = in_chunks(model.embed_audio, batch["audio"][:, 0], cfg, dist.device)
        rows.update({k: (vi.cpu(), ai.cpu()) for k, vi, ai in zip(batch["key"], v, a)})
    note_damaged(loader, cfg, data.split, dist)
    rows = gather_by_key(rows, dist)
    keys = sorted(rows)
    return torch.stack([rows[k][0] for k in keys]), torch.stack([rows[k][1] for k in keys])


def av_retrieval(cfg, model, dist) -> dict:
    """Instance-level audio-to-video and video-to-audio retrieval: only a clip's own video (or
    sound) is a hit."""
    v, a = av_embeddings(cfg, model, dist)
    ids = torch.arange(len(v))
    return {"audio_to_video": recall_at_k(a, ids, v, ids, cfg.eval.recall_at),
            "video_to_audio": recall_at_k(v, ids, a, ids, cfg.eval.recall_at), "clips": len(v),
            "chance_R@1": 1 / len(v)}


def topk_accuracy(logits, labels, ks=(1, 5)) -> dict:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    return {f"top{k}": (top[:, :k] == labels[:, None]).any(dim=1).float().mean().item() for k in ks}


def fit_linear(tr, ytr, va, yva, num_classes: int, cfg, weight_decays) -> tuple:
    """Multinomial logistic regression (L-BFGS) on standardised features for each weight decay;
    the one scoring best on (va, yva) wins (the first, where there is no validation set).
    Returns (val_top1 or None, weight_decay, classifier, standardise)."""
    mean, std = tr.mean(0), tr.std(0) + 1e-6
    standardise = lambda x: (x - mean) / std
    tr, va = standardise(tr), standardise(va)
    best = None
    for wd in weight_decays:
        clf = nn.Linear(tr.shape[1], num_classes)
        opt = torch.optim.LBFGS(clf.parameters(), max_iter=cfg.eval.linear.iterations, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(clf(tr), ytr) + wd * clf.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            val = topk_accuracy(clf(va), yva)["top1"] if len(yva) else None
        if best is None or (val is not None and val > best[0]):
            best = (val, wd, clf, standardise)
    return best


def linear_probe(cfg, model, dist) -> dict:
    """Multinomial logistic regression on frozen, standardised video features; the weight
    decay is chosen on foldN-val (under eval.protocol=paper, no hold-out: the first listed weight
    decay, trained on the whole training list), the test split is scored once."""
    results = {}
    paper = cfg.eval.protocol == "paper"
    for fold in cfg.eval.folds:
        (tr, ytr, _), (te, yte, _) = (video_features(model, cfg, split_name(cfg, s, fold), dist)
                                      for s in ("train", "test"))
        va, yva = (te[:0], yte[:0]) if paper else video_features(model, cfg, split_name(cfg, "val", fold), dist)[:2]
        decays = cfg.eval.linear.weight_decays[:1] if paper else cfg.eval.linear.weight_decays
        val, wd, clf, standardise = fit_linear(tr, ytr, va, yva, cfg.eval.num_classes, cfg, decays)
        with torch.no_grad():
            test = topk_accuracy(clf(standardise(te)), yte)
        results[f"fold{fold}"] = {"val_top1": val, "weight_decay": wd, **test, "train_videos": len(ytr),
                                  "test_videos": len(yte)}
    results["mean"] = {k: sum(r[k] for r in results.values()) / len(results) for k in ("top1", "top5")}
    return results


@torch.no_grad()
def audio_features(model: Stica, cfg, clips: list, dist) -> torch.Tensor:
    """Per clip: the audio trunk's feature of each consecutive window of the training length
    (data.num_frames at 30 fps: 1 s by default), averaged over the clip."""
    from stica.pipelines.audio import clip_spectrograms

    model.eval().to(dist.device)
    rows, t0 = {}, time.perf_counter()
    mine = list(enumerate(clips))[dist.rank::dist.world]
    for n, (i, (path, _, _)) in enumerate(mine, 1):
        specs = clip_spectrograms(path, cfg.data.audio, cfg.data.num_frames / 30)
        rows[str(i)] = in_chunks(model.audio, specs, cfg, dist.device).mean(dim=0).cpu()
        if n % 50 == 0 or n == len(mine):
            print(f"[stica.eval] audio features: {n}/{len(mine)} clips ({n / (time.perf_counter() - t0):.1f}/s)",
                  flush=True)
    rows = gather_by_key(rows, dist)
    return torch.stack([rows[str(i)] for i in range(len(clips))])


def audio_linear_probe(cfg, model, dist) -> dict:
    """Table 6: a linear probe on the audio trunk's features of ESC-50 or DCASE2014
    (eval.audio.dataset, read from eval.audio.root), one result per fold (each fold tested once,
    trained on the others). The weight decay is chosen on the next fold, held out of training,
    then the probe is refit on every training fold (eval.protocol=paper: the first weight decay)."""
    from stica.pipelines.audio import AUDIO_SETS

    if cfg.eval.audio.root is None:
        raise SystemExit("eval.audio.root is not set: the ESC-50 or DCASE2014 directory (eval.audio.dataset)")
    clips = AUDIO_SETS[cfg.eval.audio.dataset](cfg.eval.audio.root)
    classes = sorted({c for _, c, _ in clips})
    labels = torch.tensor([classes.index(c) for _, c, _ in clips])
    folds = torch.tensor([f for _, _, f in clips])
    feats = audio_features(model, cfg, clips, dist)
    results = {}
    fold_ids = sorted(set(folds.tolist()))
    for fold in fold_ids:
        val_fold = fold_ids[(fold_ids.index(fold) + 1) % len(fold_ids)]
        train, test = folds != fold, folds == fold
        if cfg.eval.protocol == "paper":
            val, wd = None, cfg.eval.linear.weight_decays[0]
        else:
            inner = train & (folds != val_fold)
            val, wd, _, _ = fit_linear(feats[inner], labels[inner], feats[folds == val_fold],
                                       labels[folds == val_fold], len(classes), cfg, cfg.eval.linear.weight_decays)
        _, _, clf, standardise = fit_linear(feats[train], labels[train], feats[:0], labels[:0], len(classes), cfg, [wd])
        with torch.no_grad():
            test_scores = topk_accuracy(clf(standardise(feats[test])), labels[test])
        results[f"fold{fold}"] = {"val_top1": val, "weight_decay": wd, **test_scores}
    results["mean"] = {k: sum(r[k] for r in results.values()) / len(results) for k in ("top1", "top5")}
    results["clips"], results["classes"] = len(clips), len(classes)
    return results


class Classifier(nn.Module):
    """The pretrained trunk and temporal pooling (transformer when pretrained with it) plus a linear layer."""

    def __init__(self, model: Stica, num_classes: int):
        super().__init__()
        self.video, self.pool = model.video, model.pool
        self.fc = nn.Linear(model.video.out_dim, num_classes)
        nn.init.orthogonal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, clips):
        return self.fc(self.pool(time_steps(self.video(clips))))


@torch.no_grad()
def score_videos(net: nn.Module, cfg, split: str, dist) -> dict:
    """eval_clips x eval_crops views per video, logits averaged per video (as released)."""
    net.eval()
    loader = build_loader(split_cfg(cfg.data, split), dist.rank, dist.world, dist.local_rank, kind="eval",
                          backend=cfg.data.loader, workers=cfg.data.workers)
    rows = {}
    for batch in loader:
        clips = batch["video"][0]
        B, N = clips.shape[:2]
        logits = in_chunks(net, clips.flatten(0, 1), cfg, dist.device).view(B, N, -1).mean(dim=1).cpu()
        rows.update({k: (z, int(l)) for k, z, l in zip(batch["key"], logits, batch["label"])})
    note_damaged(loader, cfg, split, dist)
    rows = gather_by_key(rows, dist)
    keys = sorted(rows)
    return {**topk_accuracy(torch.stack([rows[k][0] for k in keys]), torch.tensor([rows[k][1] for k in keys])),
            "videos": len(keys)}


def finetune_lr_factor(epoch: float, f) -> float:
    """GDT's schedule: linear warm-up from x1 to x`warmup_multiplier` over `warmup_epochs`
    (per step), then x`gamma` at each milestone epoch."""
    factor = 1 + (f.warmup_multiplier - 1) * min(1.0, epoch / f.warmup_epochs) if f.warmup_epochs \
        else f.warmup_multiplier
    return factor * f.gamma ** sum(epoch >= m for m in f.milestones)


def finetune(cfg, model, dist) -> dict:
    """The paper's schedule (GDT's): SGD, LR warm-up, step decay; data.eval_clips random clips
    per video per epoch; the epoch is chosen on foldN-val and only that model sees foldN-test."""
    f = cfg.eval.finetune
    if f.batch_size % dist.world:
        raise SystemExit(f"eval.finetune.batch_size={f.batch_size} is the global batch: it must split evenly over "
                         f"{dist.world} processes")
    results = {}
    for fold in cfg.eval.folds:
        net = Classifier(copy.deepcopy(model), cfg.eval.num_classes).to(dist.device)
        ddp = DistributedDataParallel(net, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None) \
            if dist.world > 1 else net
        groups = [{"params": net.fc.parameters(), "lr": f.lr_head},
                  {"params": [p for n, p in net.named_parameters() if not n.startswith("fc.")], "lr": f.lr_base}]
        opt = torch.optim.SGD(groups, momentum=f.momentum, weight_decay=f.weight_decay)
        base_lrs = [f.lr_head, f.lr_base]
        # The global batch, as the schedule's learning rates were set for (GDT: 32): any number of
        # processes then takes the same steps at the same rates.
        train_cfg = split_cfg(cfg.data, split_name(cfg, "train", fold), views=1,
                              batch_size=f.batch_size // dist.world)
        loader = build_loader(train_cfg, dist.rank, dist.world, dist.local_rank, backend=cfg.data.loader,
                              workers=cfg.data.workers)
        steps_per_epoch = len(loader) * f.clips_per_video
        amp = distributed.amp_dtype(cfg.train.amp, dist.device)
        scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
        best, step, t0 = None, 0, time.perf_counter()
        for epoch in range(f.epochs):
            ddp.train()
            for _ in range(f.clips_per_video):  # each pass draws one random clip per video
                for batch in loader:
                    factor = finetune_lr_factor(step / steps_per_epoch, f)
                    for g, lr in zip(opt.param_groups, base_lrs):
                        g["lr"] = lr * factor
                    with torch.autocast(dist.device.type, dtype=amp, enabled=amp is not None):
                        logits = ddp(batch["video"][0].to(dist.device, non_blocking=True))
                    loss = F.cross_entropy(logits.float(), batch["label"].to(dist.device))
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    step += 1
            if cfg.eval.protocol == "paper":  # no hold-out: the last epoch's model is the one tested
                best, shown = (None, epoch + 1, net.state_dict()), "-"
            else:
                val = score_videos(net, cfg, split_name(cfg, "val", fold), dist)["top1"]
                if best is None or val > best[0]:
                    best = (val, epoch + 1, copy.deepcopy(net.state_dict()))
                shown = f"{val:.3f}"
            if dist.main:
                print(f"[stica.eval] finetune fold {fold} epoch {epoch + 1}/{f.epochs}: loss {loss.item():.3f} "
                      f"val top1 {shown} ({time.perf_counter() - t0:.0f} s)", flush=True)
        net.load_state_dict(best[2])
        results[f"fold{fold}"] = {"val_top1": best[0], "epoch": best[1], "steps": step, "global_batch": f.batch_size,
                                  **score_videos(net, cfg, split_name(cfg, "test", fold), dist)}
    results["mean"] = {k: sum(r[k] for r in results.values()) / len(results) for k in ("top1", "top5")}
    return results


TASKS = {"retrieval": retrieval, "av-retrieval": av_retrieval, "linear": linear_probe, "finetune": finetune,
         "audio-linear": audio_linear_probe}


def markdown(task: str, checkpoint, results: dict) -> str:
    lines = [f"# stica.eval {task}", "", f"checkpoint: {checkpoint or 'none (random initialisation)'}", "",
             "| part | " + " | ".join(next(v for v in results.values() if isinstance(v, dict))) + " |"]
    lines.append("|---" * (1 + len(next(v for v in results.values() if isinstance(v, dict)))) + "|")
    for part, values in results.items():
        if isinstance(values, dict):
            lines.append(f"| {part} | " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v)
                                                   for v in values.values()) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stica.eval", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("task", choices=sorted(TASKS), help="what to evaluate: " + ", ".join(sorted(TASKS)))
    parser.add_argument("--config", required=True, help="a YAML config under configs/ (eval_ucf101.yaml, eval_hmdb51.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. eval.checkpoint=runs/x/checkpoint.pt")
    return parser


def main(argv=None):
    args = build_parser().parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    check_protocol(cfg)
    dist = distributed.setup(cfg.train.backend)
    model = load_model(cfg, cfg.eval.checkpoint)
    results = TASKS[args.task](cfg, model, dist)
    if dist.main:
        out = Path(cfg.eval.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.task}.json").write_text(json.dumps(results, indent=1))
        report = markdown(args.task, cfg.eval.checkpoint, results)
        (out / f"{args.task}.md").write_text(report)
        print(report + f"[stica.eval] wrote {out / args.task}.json and .md", flush=True)
    distributed.teardown()
    return results


if __name__ == "__main__":
    main()
