"""stica-demo: the whole system on a built-in synthetic corpus, on CPU, in a few minutes.

1. Generate videos in which sound and picture are tied: a shape (the class: disc, square, ring,
   bar) of a random hue moves at a random speed; the soundtrack's pitch follows the hue, its
   beat the speed, its timbre the class.
2. Pack them with stica-shard (Kinetics-style CSV with a train and a val split).
3. Pretrain with the real trainer on 2 CPU processes (torchrun, gloo).
4. On held-out clips: audio-to-video and video-to-audio retrieval recall@1 and a linear probe
   of the shapes, for the trained model and the same model at initialisation, against
   chance; the loss curve as a PNG.
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

from stica import distributed
from stica.config import load_config
from stica.eval import av_retrieval, linear_probe, load_model
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


def make_video(path: Path, shape: str, hue: float, speed: float, phase: float, audio: bool = True):
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

    write_av(path, frame, [i / FPS for i in range(int(SECONDS * FPS))], sound if audio else None, audio_rate=24000,
             size=(SIZE, SIZE))


def make_corpus(root: Path, train: int, val: int, test: int = 0, seed: int = 0) -> Path:
    """Videos under root/<shape>/ named as Kinetics clips, plus the annotation CSV."""
    rng = np.random.default_rng(seed)
    rows = ["label,youtube_id,time_start,time_end,split"]
    for i in range(train + val + test):
        shape = SHAPES[i % len(SHAPES)]
        yid = f"synth{i:05d}"
        (root / shape).mkdir(parents=True, exist_ok=True)
        path = root / shape / f"{yid}_000000_000002.mp4"
        if not path.exists():
            make_video(path, shape, hue=rng.uniform(), speed=rng.uniform(0.5, 2.0), phase=rng.uniform(0, 2 * np.pi))
        else:
            rng.uniform(size=3)  # keep later videos identical whether or not earlier ones existed
        split = "train" if i < train else "val" if i < train + val else "test"
        rows.append(f"{shape},{yid},0,2,{split}")
    csv = root / "annotations.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="working directory (videos, shards, run)")
    parser.add_argument("--train-videos", type=int, default=256)
    parser.add_argument("--val-videos", type=int, default=64, help="held out for model selection (linear probe)")
    parser.add_argument("--test-videos", type=int, default=64, help="held out for scoring (retrieval, probe)")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--procs", type=int, default=2, help="training processes (torchrun, gloo)")
    parser.add_argument("overrides", nargs="*", help="extra trainer overrides, key=value")
    args = parser.parse_args(argv)
    out = Path(args.out)
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    if not config.exists():  # installed without the source tree
        raise SystemExit(f"{config} not found: run stica-demo from a source checkout")
    t0 = time.perf_counter()

    print(f"[demo] 1/4 generating {args.train_videos} + {args.val_videos} + {args.test_videos} synthetic audio-visual "
          f"videos in {out}/videos")
    csv = make_corpus(out / "videos", args.train_videos, args.val_videos, args.test_videos)

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

    print("[demo] 4/4 evaluating on the held-out clips, trained and at initialisation")
    cfg = load_config(config, overrides + ["data.split=test"])
    dist = distributed.setup("gloo")
    scores = {}
    for name, checkpoint in (("trained", str(run_dir / "checkpoint.pt")), ("initial", None)):
        model = load_model(cfg, checkpoint)
        av = av_retrieval(cfg, model, dist)
        probe = linear_probe(cfg, model, dist)["mean"]
        scores[name] = {"a2v_R@1": av["audio_to_video"]["R@1"], "v2a_R@1": av["video_to_audio"]["R@1"],
                        "probe_top1": probe["top1"]}
    n = av["clips"]
    log = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]
    clips_per_s = float(np.median([r["clips_per_s"] for r in log[1:] or log]))
    result = {**scores, "chance_R@1": 1 / n, "chance_probe": 1 / len(SHAPES), "queries": n,
              "train_seconds": train_seconds, "train_clips_per_s": clips_per_s,
              "total_seconds": time.perf_counter() - t0, "loss_curve": str(run_dir / "loss.png")}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    t, i = scores["trained"], scores["initial"]
    print(f"[demo] audio->video recall@1 on {n} held-out clips: trained {t['a2v_R@1']:.3f} | at initialisation "
          f"{i['a2v_R@1']:.3f} | chance {1 / n:.3f}")
    print(f"[demo] video->audio recall@1: trained {t['v2a_R@1']:.3f} | at initialisation {i['v2a_R@1']:.3f}")
    print(f"[demo] linear probe (4 shapes) top-1: trained {t['probe_top1']:.3f} | at initialisation "
          f"{i['probe_top1']:.3f} | chance {1 / len(SHAPES):.3f}")
    print(f"[demo] training {train_seconds:.0f} s at {clips_per_s:.1f} clips/s; total {result['total_seconds']:.0f} s; "
          f"loss curve {run_dir / 'loss.png'}; result {out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
