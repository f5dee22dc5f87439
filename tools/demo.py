"""stica-demo: the whole system on a built-in synthetic corpus, on CPU, in a few minutes.

1. Generate videos in which sound and picture are tied: a shape (the class: disc, square, ring,
   bar) of a random hue moves at a random speed; the soundtrack's pitch follows the hue, its
   beat the speed, its timbre the class.
2. Pack them with stica-shard (Kinetics-style CSV with a train and a val split).
3. Pretrain with the real trainer on 2 CPU processes (torchrun, gloo).
4. Audio-to-video retrieval on the held-out clips: recall@1 of the trained model against the
   same model at initialisation and against chance, and the loss curve as a PNG.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stica.config import load_config
from stica.model import Stica
from stica.pipelines.loader import build_loader
from stica.tools.synth import write_av

SHAPES = ("disc", "square", "ring", "bar")
SIZE, FPS, SECONDS = 64, 30, 2.0


def draw(shape: str, rgb, cx: float, cy: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    dx, dy = xx - cx, yy - cy
    r = np.hypot(dx, dy)
    mask = {"disc": r < 10, "square": (abs(dx) < 9) & (abs(dy) < 9), "ring": (r < 12) & (r > 7),
            "bar": (abs(dx) < 14) & (abs(dy) < 4)}[shape]
    frame = np.full((SIZE, SIZE, 3), 24, np.uint8)
    frame[mask] = rgb
    return frame


def make_video(path: Path, shape: str, hue: float, speed: float, phase: float):
    rgb = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.9, 0.95))
    pitch = 300.0 * 2 ** (2 * hue)  # two octaves across the hue circle
    timbre = SHAPES.index(shape)

    def frame(t):
        angle = phase + 2 * np.pi * speed * t / 2
        return draw(shape, rgb, SIZE / 2 + 18 * np.cos(angle), SIZE / 2 + 18 * np.sin(angle))

    def sound(t):
        tone = sum(np.sin(2 * np.pi * pitch * k * t) / k for k in range(1, 2 + timbre))
        beat = 0.55 + 0.45 * np.sin(2 * np.pi * 2 * speed * t + phase)  # louder on each half turn
        return 0.25 * tone * beat

    write_av(path, frame, [i / FPS for i in range(int(SECONDS * FPS))], sound, audio_rate=24000,
             size=(SIZE, SIZE))


def make_corpus(root: Path, train: int, val: int, seed: int = 0) -> Path:
    """Videos under root/<shape>/ named as Kinetics clips, plus the annotation CSV."""
    rng = np.random.default_rng(seed)
    rows = ["label,youtube_id,time_start,time_end,split"]
    for i in range(train + val):
        shape = SHAPES[i % len(SHAPES)]
        yid = f"synth{i:05d}"
        (root / shape).mkdir(parents=True, exist_ok=True)
        path = root / shape / f"{yid}_000000_000002.mp4"
        if not path.exists():
            make_video(path, shape, hue=rng.uniform(), speed=rng.uniform(0.5, 2.0), phase=rng.uniform(0, 2 * np.pi))
        else:
            rng.uniform(size=3)  # keep later videos identical whether or not earlier ones existed
        rows.append(f"{shape},{yid},0,2,{'train' if i < train else 'val'}")
    csv = root / "annotations.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


@torch.no_grad()
def retrieval_recall_at_1(model: Stica, cfg) -> tuple[float, int]:
    """Audio-to-video: each held-out clip's sound queries all held-out clips' pictures (one centre
    clip and crop per video); a hit when its own video is the nearest by cosine similarity."""
    model.eval()
    cfg = cfg.copy()
    cfg.split, cfg.eval_clips, cfg.eval_crops = "val", 1, 1
    videos, audios = [], []
    for batch in build_loader(cfg, kind="eval", backend="reference", workers=0):
        videos.append(model.embed_map(model.video(batch["video"][0][:, 0])))
        audios.append(model.embed_audio(batch["audio"][:, 0]))
    v, a = torch.cat(videos), torch.cat(audios)
    hits = (a @ v.T).argmax(dim=1) == torch.arange(len(a))
    return hits.float().mean().item(), len(a)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="working directory (videos, shards, run)")
    parser.add_argument("--train-videos", type=int, default=256)
    parser.add_argument("--val-videos", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--procs", type=int, default=2, help="training processes (torchrun, gloo)")
    parser.add_argument("overrides", nargs="*", help="extra trainer overrides, key=value")
    args = parser.parse_args(argv)
    out = Path(args.out)
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    if not config.exists():  # installed without the source tree
        raise SystemExit(f"{config} not found: run stica-demo from a source checkout")
    t0 = time.perf_counter()

    print(f"[demo] 1/4 generating {args.train_videos} + {args.val_videos} synthetic audio-visual videos in {out}/videos")
    csv = make_corpus(out / "videos", args.train_videos, args.val_videos)

    print("[demo] 2/4 packing them with stica-shard")
    from stica.tools.shard import main as shard_main

    shards = out / "shards"
    status = shard_main(["pack", "--root", str(out / "videos"), "--csv", str(csv), "--out", str(shards),
                         "--short-side", str(SIZE), "--workers", str(os.cpu_count() or 1)])
    if status != 0:
        raise SystemExit(f"[demo] packing reported failures: see {shards}/failures.jsonl")

    run_dir = out / "train"
    overrides = [f"data.shards={shards}", f"run.dir={run_dir}", f"optim.epochs={args.epochs}", *args.overrides]
    print(f"[demo] 3/4 pretraining on {args.procs} CPU processes: torchrun -m stica.train --config {config} "
          + " ".join(overrides))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.procs}",
           "-m", "stica.train", "--config", str(config), *overrides]
    t_train = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    train_seconds = time.perf_counter() - t_train

    print("[demo] 4/4 audio-to-video retrieval on the held-out clips")
    cfg = load_config(config, overrides)
    torch.manual_seed(cfg.run.seed)  # the trainer's initialisation (rank 0 seed)
    initial = Stica(cfg.model)
    trained = Stica(cfg.model)
    trained.load_state_dict(torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["model"])
    r_init, n = retrieval_recall_at_1(initial, cfg.data)
    r_trained, _ = retrieval_recall_at_1(trained, cfg.data)
    log = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]
    clips_per_s = float(np.median([r["clips_per_s"] for r in log[1:] or log]))
    result = {"recall_at_1_trained": r_trained, "recall_at_1_initial": r_init, "chance": 1 / n, "queries": n,
              "train_seconds": train_seconds, "train_clips_per_s": clips_per_s,
              "total_seconds": time.perf_counter() - t0, "loss_curve": str(run_dir / "loss.png")}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"[demo] audio->video recall@1 on {n} held-out clips: trained {r_trained:.3f} | at initialisation "
          f"{r_init:.3f} | chance {1 / n:.3f}")
    print(f"[demo] training {train_seconds:.0f} s at {clips_per_s:.1f} clips/s; total {result['total_seconds']:.0f} s; "
          f"loss curve {run_dir / 'loss.png'}; result {out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
