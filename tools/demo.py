"""stica-demo: the whole system on a built-in synthetic corpus, on CPU, in under 10 minutes.

1. Generate videos in which what the sound shares with the picture is what the downstream task asks
   for: the class is the shape that bounces (disc, upright stick, ring, flat bar), and it sings in
   its own register, an octave apart, louder at each landing. Everything else varies independently
   of the sound, as in real video: the shape's colour, position and bounce height and rate, a
   drifting background grating of random colours, a cross gliding across in silence, noise and a
   hum. Within its register the voice is lower for a bigger shape, and its swells follow the
   landings: what a clip's sound tells about its own video beyond the class.
2. Pack them with stica-shard (Kinetics-style CSV: train, val and test splits, at 15 fps so that a
   16-frame clip spans a second and several landings).
3. Pretrain with the real trainer on 2 CPU processes (torchrun, gloo).
4. Score the trained model and the same model at initialisation on the held-out test videos:
   audio->video and video->audio R@1 and R@5 (the centre clip of each), class retrieval R@1 (test
   videos query the training videos on trunk features), linear-probe top-1 (trained on the
   training videos, its weight decay chosen on val). Each with a 95% bootstrap interval over the
   test videos, next to chance, and a verdict. Writes OUT/demo.json and OUT/demo.png.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stica import distributed
from stica.config import HelpFormatter, load_config
from stica.eval import av_embeddings, fit_linear, hits_at_k, load_model, split_name, video_features
from stica.tools.pack import pool_start_method
from stica.tools.synth import write_av

SHAPES = ("disc", "stick", "ring", "bar")  # the classes: the shape that sounds (stick: upright, bar: flat)
REGISTERS = {shape: 330.0 * 2**i for i, shape in enumerate(SHAPES)}  # Hz: each shape's voice, an octave apart
SIZE, FPS, SECONDS, AUDIO_RATE = 64, 15, 3.0, 24000
SIZES, SPREAD = (5.0, 13.0), 0.3  # radius range (px); its pitch range, +-octaves about the register


def draw(shape: str, dx: np.ndarray, dy: np.ndarray, s: float) -> np.ndarray:
    r = np.hypot(dx, dy)
    return {"disc": r < s, "stick": (abs(dx) < 0.45 * s) & (abs(dy) < 1.4 * s), "ring": (r < 1.2 * s) & (r > 0.7 * s),
            "bar": (abs(dx) < 1.4 * s) & (abs(dy) < 0.45 * s),
            "cross": ((abs(dx) < 0.25 * s) | (abs(dy) < 0.25 * s)) & (abs(dx) < s) & (abs(dy) < s)}[shape]


def rgb(hue: float, saturation: float = 0.85, value: float = 0.95) -> np.ndarray:
    return 255 * np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def make_video(path: Path, shape: str, rng: np.random.Generator, audio: bool = True):
    """A shape bounces and sings in its register; a cross glides by in silence."""
    size = rng.uniform(*SIZES)
    pitch = REGISTERS[shape] * 2 ** (SPREAD * (1 - 2 * (size - SIZES[0]) / (SIZES[1] - SIZES[0])))  # bigger sings lower
    rate, phase = rng.uniform(1.5, 4.5), rng.uniform()  # landings per second; the first one, in periods
    height, x0, floor = rng.uniform(6, 20), rng.uniform(1.5 * size, SIZE - 1.5 * size), rng.uniform(40, 60 - size)
    colour = rgb(rng.uniform())
    angle, spatial_freq, drift = rng.uniform(0, np.pi), rng.uniform(0.05, 0.2), rng.uniform(-1, 1)
    bg1, bg2 = (rgb(rng.uniform(), 0.4, rng.uniform(0.2, 0.45)) for _ in range(2))
    d_colour, d_size = rgb(rng.uniform()), rng.uniform(5, 11)
    d_pos, d_vel = rng.uniform(0, SIZE, 2), rng.normal(0, 25, 2)
    noise, hum, hum_level = rng.uniform(0.002, 0.02), rng.uniform(80, 200), rng.uniform(0, 0.1)
    seed = rng.integers(2**31)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    along = xx * np.cos(angle) + yy * np.sin(angle)

    def frame(t):
        w = (0.5 + 0.5 * np.sin(2 * np.pi * (spatial_freq * along + drift * t)))[..., None]
        img = bg1 * w + bg2 * (1 - w)
        dx, dy = (d_pos + d_vel * t) % SIZE
        img[draw("cross", xx - dx, yy - dy, d_size)] = d_colour
        y = floor - height * abs(np.sin(np.pi * (rate * t + phase)))  # on the floor every 1/rate s
        img[draw(shape, xx - x0, yy - y, size)] = colour
        return np.clip(img, 0, 255).astype(np.uint8)

    def sound(t):
        since = ((rate * t + phase) % 1.0) / rate  # seconds since the last landing: louder on each
        voice = sum(np.sin(2 * np.pi * pitch * k * t) / k for k in (1, 2, 3))
        return (0.25 * (0.3 + 0.7 * np.exp(-since / 0.06)) * voice
                + np.random.default_rng(seed).normal(0, noise, t.shape) + hum_level * np.sin(2 * np.pi * hum * t))

    write_av(path, frame, [i / FPS for i in range(int(SECONDS * FPS))], sound if audio else None,
             audio_rate=AUDIO_RATE, size=(SIZE, SIZE))


def _make_one(job):
    path, cls, seed, index = job
    if not path.exists():
        make_video(path, cls, np.random.default_rng([seed, index]))


def make_corpus(root: Path, train: int, val: int, test: int = 0, seed: int = 0, workers: int = 1) -> Path:
    """Videos under root/<class>/ named as Kinetics clips, plus the annotation CSV. Video i depends
    on (seed, i) alone, so a rerun regenerates only what is missing."""
    root = Path(root)
    rows, jobs = ["label,youtube_id,time_start,time_end,split"], []
    for i in range(train + val + test):
        cls, yid = SHAPES[i % len(SHAPES)], f"synth{i:05d}"
        (root / cls).mkdir(parents=True, exist_ok=True)
        jobs.append((root / cls / f"{yid}_000000_000003.mp4", cls, seed, i))
        split = "train" if i < train else "val" if i < train + val else "test"
        rows.append(f"{cls},{yid},0,{SECONDS:g},{split}")
    if workers > 1:
        with multiprocessing.get_context(pool_start_method()).Pool(workers) as pool:
            pool.map(_make_one, jobs, chunksize=8)
    else:
        for job in jobs:
            _make_one(job)
    csv = root / "annotations.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


# Scoring ------------------------------------------------------------------------------------

RECALLS = (("audio->video", 1), ("audio->video", 5), ("video->audio", 1), ("video->audio", 5))


def per_video_scores(cfg, model, dist) -> tuple[dict[str, np.ndarray], dict]:
    """Per test video, 1.0 where the model gets it right, for each metric; and the chance level of each."""
    (tr, ytr), (va, yva), (te, yte) = (video_features(model, cfg, split_name(cfg, s, 1), dist)[:2]
                                       for s in ("train", "val", "test"))
    _, _, clf, standardise = fit_linear(tr, ytr, va, yva, cfg.eval.num_classes, cfg, cfg.eval.linear.weight_decays)
    with torch.no_grad():
        probe = clf(standardise(te)).argmax(dim=1) == yte
    v, a = av_embeddings(cfg, model, dist)
    ids = torch.arange(len(v))
    queries = {"audio->video": (a, v), "video->audio": (v, a)}
    scores = {f"{d} R@{k}": hits_at_k(queries[d][0], ids, queries[d][1], ids, k) for d, k in RECALLS}
    scores |= {"class retrieval R@1": hits_at_k(te, yte, tr, ytr, 1), "linear probe top-1": probe}
    return {k: s.float().numpy() for k, s in scores.items()}, chance_levels(ytr.numpy(), yte.numpy(),
                                                                             cfg.eval.num_classes)


def chance_levels(train_labels: np.ndarray, test_labels: np.ndarray, classes: int) -> dict[str, float]:
    share = np.bincount(train_labels, minlength=classes) / len(train_labels)  # a random neighbour's odds
    return {**{f"{d} R@{k}": min(1.0, k / len(test_labels)) for d, k in RECALLS},
            "class retrieval R@1": float(share[test_labels].mean()), "linear probe top-1": 1 / classes}


def bootstrap_ci(hits: np.ndarray, draws: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of the mean over test videos resampled with replacement (draws:
    one row of indices per resample, shared by the trained and the initial model)."""
    means = hits[draws].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def verdict(trained_ci, init_ci) -> str:
    if trained_ci[0] > init_ci[1]:
        return "better"
    if trained_ci[1] < init_ci[0]:
        return "worse"
    return "not distinguishable"


def summarise(trained: dict, init: dict, chance: dict, resamples: int = 2000, seed: int = 0) -> list[dict]:
    n = len(next(iter(trained.values())))
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    rows = []
    for name in trained:
        t_ci, i_ci = bootstrap_ci(trained[name], draws), bootstrap_ci(init[name], draws)
        rows.append({"name": name, "trained": float(trained[name].mean()), "trained_ci": t_ci,
                     "init": float(init[name].mean()), "init_ci": i_ci, "chance": chance[name],
                     "verdict": verdict(t_ci, i_ci)})
    return rows


def plot(metrics: list[dict], log_path: Path, png_path: Path):
    from stica.plots import draw_loss, plt

    fig, (ax_loss, ax_m) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.6]})
    draw_loss(ax_loss, log_path, "pretraining loss")
    x = np.arange(len(metrics))
    for offset, key, label, colour in ((-0.15, "trained", "trained", "tab:blue"),
                                       (0.15, "init", "at initialisation", "tab:grey")):
        values = np.array([m[key] for m in metrics])
        ci = np.array([m[f"{key}_ci"] for m in metrics]).T
        ax_m.errorbar(x + offset, values, yerr=[values - ci[0], ci[1] - values], fmt="o", capsize=4, color=colour,
                      label=f"{label} (95% bootstrap interval)")
    ax_m.scatter(x, [m["chance"] for m in metrics], marker="_", s=600, color="tab:red", label="chance", zorder=3)
    ax_m.set_xticks(x, [m["name"].replace(" R@", "\nR@").replace(" top", "\ntop") for m in metrics], fontsize=8)
    ax_m.set(ylabel="score on held-out videos", ylim=(0, 1), title="downstream: trained vs initialisation")
    ax_m.legend(fontsize=8, loc="upper left")
    ax_m.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def table(metrics: list[dict]) -> str:
    lines = [f"{'metric':<22} {'trained (95% CI)':<24} {'initialisation (95% CI)':<24} {'chance':>7}  verdict"]
    for m in metrics:
        t = f"{m['trained']:.3f} ({m['trained_ci'][0]:.3f}-{m['trained_ci'][1]:.3f})"
        i = f"{m['init']:.3f} ({m['init_ci'][0]:.3f}-{m['init_ci'][1]:.3f})"
        lines.append(f"{m['name']:<22} {t:<24} {i:<24} {m['chance']:>7.3f}  {m['verdict']}")
    return "\n".join(lines)


# The committed result: README.md and docs/demo.md render their tables from these files.
ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "figures" / "demo.json"
PAGES = (ROOT / "README.md", ROOT / "docs" / "demo.md")


def seed_record(seed: int) -> Path:
    return RECORD if seed == 0 else RECORD.with_name(f"demo-seed-{seed}.json")


def score_table(result: dict) -> str:
    rows = ["| score | trained (95% interval) | at initialisation (95% interval) | chance | verdict |",
            "|---|---|---|---|---|"]
    for m in result["metrics"]:
        rows.append(f"| {m['name']} | {m['trained']:.3f} ({m['trained_ci'][0]:.3f}-{m['trained_ci'][1]:.3f}) | "
                    f"{m['init']:.3f} ({m['init_ci'][0]:.3f}-{m['init_ci'][1]:.3f}) | {m['chance']:.3f} | "
                    f"{m['verdict']} |")
    stages = ", ".join(f"{name} {sec:.0f} s" for name, sec in result["stage_seconds"].items())
    return "\n".join(rows) + (f"\n\n{result['date']}, {result['commit']}, {result['machine']}: {result['total_seconds']:.0f} s "
                              f"in all ({stages}).")


def seeds_table(results: list[dict]) -> str:
    rows = ["| seed | better beyond the interval | probe | class retrieval | A->V R@5 | A->V R@1 | V->A R@1 | time |",
            "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r["seed"]):
        m = {x["name"]: x for x in r["metrics"]}
        better = sum(x["verdict"] == "better" for x in r["metrics"])
        r1 = lambda name: f"{m[name]['trained']:.3f} ({m[name]['trained_ci'][0]:.3f}-{m[name]['trained_ci'][1]:.3f})"
        rows.append(f"| {r['seed']}{' (the default)' if r['seed'] == 0 else ''} | "
                    f"{'**' if better == len(m) else ''}{better} of {len(m)}{'**' if better == len(m) else ''} | "
                    f"{m['linear probe top-1']['trained']:.3f} | {m['class retrieval R@1']['trained']:.3f} | "
                    f"{m['audio->video R@5']['trained']:.3f} | {r1('audio->video R@1')} | {r1('video->audio R@1')} | "
                    f"{r['total_seconds']:.0f} s |")
    return "\n".join(rows)


def rendered_blocks() -> dict[str, str]:
    """Each marked block of the pages, as the committed results render it."""
    records = [json.loads(p.read_text()) for p in sorted(RECORD.parent.glob("demo*.json"))]
    return {"scores": score_table(json.loads(RECORD.read_text())), "seeds": seeds_table(records)}


def render(text: str, blocks: dict[str, str]) -> str:
    """`text` with every `<!-- demo:NAME -->` ... `<!-- /demo:NAME -->` block replaced by its rendering."""
    for name, block in blocks.items():
        start, end = f"<!-- demo:{name} -->", f"<!-- /demo:{name} -->"
        if start in text:
            head, rest = text.split(start, 1)
            text = f"{head}{start}\n{block}\n{end}{rest.split(end, 1)[1]}"
    return text


def source_commit() -> str:
    """The checkout's commit, marked where tracked files other than the pages differ from it (the
    record itself re-renders the pages)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!*.md"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{os.cpu_count()} cores of {model}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stica-demo", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="working directory (videos, shards, run)")
    parser.add_argument("--train-videos", type=int, default=512, help="videos to pretrain on")
    parser.add_argument("--val-videos", type=int, default=64, help="held out: the probe's weight decay")
    parser.add_argument("--test-videos", type=int, default=192, help="held out: every score")
    parser.add_argument("--epochs", type=int, default=None, help="pretraining epochs (unset: optim.epochs of "
                                                                  "configs/demo.yaml)")
    parser.add_argument("--procs", type=int, default=2, help="training processes (torchrun, gloo)")
    parser.add_argument("--seed", type=int, default=0, help="data.seed and run.seed of the pretraining")
    parser.add_argument("--record", action="store_true",
                        help="store the result as the committed one (docs/figures/demo.json at seed 0, "
                             "demo-seed-S.json otherwise) and render the README's and docs/demo.md's tables")
    parser.add_argument("overrides", nargs="*", help="extra trainer overrides, key=value")
    return parser


# Scoring takes about this share of the training time on 2 cores (2026-12-07: 48 s after 330 s):
# both models' features of every video, one clip each, forward only.
SCORING_SHARE = 0.15


def train_with_eta(cmd: list[str], env: dict, t0: float):
    """Runs the trainer, passing its lines on; to each of its ETA lines adds the whole demo's."""
    started = time.perf_counter()
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:
            match = re.search(r"eta ([0-9.]+) min", line)
            if match:
                left = float(match.group(1)) * 60
                step, total = (int(x) for x in re.search(r"step (\d+)/(\d+)", line).groups())
                scoring = SCORING_SHARE * (time.perf_counter() - started) * total / max(step, 1)
                line = line.rstrip("\n") + f" | demo: {time.perf_counter() - t0:.0f} s in, {(left + scoring) / 60:.1f} min to go\n"
            print(line, end="", flush=True)
    if proc.returncode:
        raise SystemExit(f"[demo] pretraining failed (exit {proc.returncode})")


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    config = ROOT / "configs" / "demo.yaml"
    if not config.exists():  # installed without the source tree
        raise SystemExit(f"{config} not found: run stica-demo from a source checkout")
    defaults = build_parser().parse_args([])
    if args.record and any(getattr(args, k) != getattr(defaults, k) for k in
                           ("train_videos", "val_videos", "test_videos", "epochs", "procs", "overrides")):
        raise SystemExit("--record stores the demo as shipped: leave the corpus, epochs, processes and "
                         "overrides at their defaults (--seed may change)")
    t0 = time.perf_counter()
    stages = {}

    def finished(stage: str):  # each stage's seconds: the time since the previous one ended
        stages[stage] = time.perf_counter() - t0 - sum(stages.values())

    workers = os.cpu_count() or 1

    print(f"[demo] 1/4 generating {args.train_videos} + {args.val_videos} + {args.test_videos} synthetic audio-visual "
          f"videos in {out}/videos", flush=True)
    csv = make_corpus(out / "videos", args.train_videos, args.val_videos, args.test_videos, workers=workers)
    finished("corpus")

    print(f"[demo] 2/4 packing them with stica-shard ({time.perf_counter() - t0:.0f} s in)", flush=True)
    from stica.tools.shard import main as shard_main

    shards = out / "shards"
    status = shard_main(["pack", "--root", str(out / "videos"), "--csv", str(csv), "--out", str(shards),
                         "--short-side", str(SIZE), "--fps", str(FPS), "--workers", str(workers)])
    if status != 0:
        raise SystemExit(f"[demo] packing reported failures: see {shards}/failures.jsonl")
    finished("packing")

    run_dir = out / "train"
    epochs = [f"optim.epochs={args.epochs}"] if args.epochs is not None else []
    overrides = [f"data.shards={shards}", f"run.dir={run_dir}", f"data.seed={args.seed}", f"run.seed={args.seed}",
                 *epochs, *args.overrides]
    print(f"[demo] 3/4 pretraining on {args.procs} CPU processes ({time.perf_counter() - t0:.0f} s in): torchrun -m "
          f"stica.train --config {config} " + " ".join(overrides), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 processes of 1 thread: 23.4 clips/s, 1 of 2: 15.6 (2026-12-07)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.procs}",
           "-m", "stica.train", "--config", str(config), *overrides]
    train_with_eta(cmd, env, t0)
    finished("training")

    print(f"[demo] 4/4 scoring the trained model and the same model at initialisation on the held-out videos "
          f"({time.perf_counter() - t0:.0f} s in, about {SCORING_SHARE * stages['training']:.0f} s to go)", flush=True)
    cfg = load_config(config, overrides + ["data.split=test"])
    dist = distributed.setup("gloo")
    trained, chance = per_video_scores(cfg, load_model(cfg, str(run_dir / "checkpoint.pt")), dist)
    init, _ = per_video_scores(cfg, load_model(cfg, None), dist)
    metrics = summarise(trained, init, chance)
    finished("scoring")
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    better = sum(m["verdict"] == "better" for m in metrics)
    result = {"metrics": metrics, "better": better, "seed": args.seed, "test_videos": args.test_videos,
              "train_videos": args.train_videos, "steps": log[-1]["step"],
              "train_clips_per_s": float(np.median([r["clips_per_s"] for r in log[1:] or log])),
              "stage_seconds": {k: round(v, 1) for k, v in stages.items()},
              "total_seconds": round(time.perf_counter() - t0, 1), "date": time.strftime("%Y-%m-%d"),
              "commit": source_commit(), "machine": machine()}
    (out / "demo.json").write_text(json.dumps(result, indent=1))
    plot(metrics, run_dir / "log.jsonl", out / "demo.png")
    print(table(metrics))
    print(f"[demo] pretraining beats initialisation beyond its 95% interval on {better} of {len(metrics)} metrics "
          f"({args.test_videos} held-out videos); {result['total_seconds']:.0f} s in all ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()) + f"); {out / 'demo.json'}, {out / 'demo.png'}")
    if args.record:
        seed_record(args.seed).write_text(json.dumps(result, indent=1) + "\n")
        if args.seed == 0:
            shutil.copyfile(out / "demo.png", RECORD.with_suffix(".png"))
        blocks = rendered_blocks()
        for page in PAGES:
            page.write_text(render(page.read_text(), blocks))
        print(f"[demo] recorded {seed_record(args.seed)}; README.md and docs/demo.md re-rendered: commit them together")
    return 0


if __name__ == "__main__":
    sys.exit(main())
