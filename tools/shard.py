"""stica-shard: pack a video dataset into WebDataset shards (`pack`, on several machines with
`--part I/N` then `merge`) and check them (`verify`)."""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

from stica.config import HelpFormatter
from stica.tools.supervise import StartError
from stica.tools.transcode import PackOptions

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GiB, 200MB, 50000)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def parse_part(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"not a part: {text!r} (I/N with 0 <= I < N, e.g. 3/16)")
    return int(m.group(1)), int(m.group(2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stica-shard", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = PackOptions()
    p = sub.add_parser("pack", help="transcode and pack videos into shards (resumes when rerun)",
                       formatter_class=HelpFormatter)
    p.add_argument("--root", required=True, help="directory holding the videos (class folders or flat)")
    p.add_argument("--csv", action="append", default=[],
                   help="Kinetics annotation CSV (label,youtube_id,time_start,time_end[,split]); repeatable. "
                        "Without it, --root is read as a class-folder tree")
    p.add_argument("--split", default="train", help="split name for a class-folder tree")
    p.add_argument("--ucf101-splits", metavar="DIR", help="UCF-101 split files (trainlist0N.txt, testlist0N.txt)")
    p.add_argument("--hmdb51-splits", metavar="DIR", help="HMDB-51 split files (<class>_test_splitN.txt)")
    p.add_argument("--folds", default="1,2,3", help="UCF-101/HMDB-51 folds to pack as foldN-{train,val,test}")
    p.add_argument("--val-share", type=float, default=0.1,
                   help="share of each UCF-101/HMDB-51 training list held out as foldN-val (model selection)")
    p.add_argument("--out", required=True, help="output directory for shards, manifest and failures")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel transcoders, one per core unless set")
    p.add_argument("--video-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a video still transcoding after this long is reported (stage: timeout) and its worker "
                        "replaced")
    p.add_argument("--part", type=parse_part, default=None, metavar="I/N",
                   help="pack part I (0-based) of N into the shared --out, e.g. from a SLURM array "
                        "(--part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); then `stica-shard merge OUT`")
    p.add_argument("--seed", type=int, default=0, help="write-time shuffle seed (recorded in the manifest)")
    p.add_argument("--shard-size", type=parse_size, default="1GiB", help="close a shard past this size")
    p.add_argument("--shard-samples", type=int, default=None, help="or past this many samples (unset: by size only)")
    p.add_argument("--fps", type=int, default=d.fps, help="constant frame rate of the packed video")
    p.add_argument("--short-side", type=int, default=d.short_side, help="packed frame's short side in pixels")
    p.add_argument("--codec", choices=["vp9", "h264"], default=d.codec,
                   help="vp9 decodes on DALI's CPU and GPU paths; h264 only on the GPU")
    p.add_argument("--crf", type=int, default=d.crf, help="encoder quality (lower: better, larger)")
    p.add_argument("--speed", type=int, default=d.speed, help="libvpx cpu-used (higher: faster, larger)")
    p.add_argument("--seg-frames", type=int, default=d.seg_frames,
                   help="frames per independently decodable segment (and keyframe interval)")
    p.add_argument("--audio-rate", type=int, default=d.audio_rate, help="audio member's sample rate (Hz)")
    p.add_argument("--min-frames", type=int, default=d.min_frames, help="shorter videos are reported, not packed")
    p.add_argument("--max-lost-share", type=float, default=d.max_lost_share,
                   help="conceal corrupt packets (video: previous frame held; audio: silence) unless they lose "
                        "more than this share of the duration ...")
    p.add_argument("--max-lost-seconds", type=float, default=d.max_lost_seconds, help="... or this many seconds")
    p.add_argument("--allow-no-audio", action="store_true",
                   help="pack videos without audio as silence with has_audio=0 (default: report and skip; "
                        "always on with --ucf101-splits/--hmdb51-splits, whose evaluation is video-only)")
    m = sub.add_parser("merge", help="write the manifest of a job packed in parts, once every part is complete",
                       formatter_class=HelpFormatter)
    m.add_argument("dir", help="the shared --out of the parts")
    v = sub.add_parser("verify", help="re-read every shard: checksums, DALI reads, decodes, counts",
                       formatter_class=HelpFormatter)
    v.add_argument("dir", help="a stica-shard output directory")
    v.add_argument("--device", choices=["cpu", "mixed"], default="cpu",
                   help="DALI decoder backend (mixed = NVDEC, needed for h264 shards)")
    v.add_argument("--sources", default=None,
                   help="the source videos' root: each sample whose source is found there (by file name) must "
                        "have the geometry a player shows of it (rotation, pixel aspect)")
    return parser


def pack(args) -> int:
    from stica.tools import pack as job
    from stica.tools import sources as src

    folds = [int(f) for f in args.folds.split(",")]
    if args.ucf101_splits:
        sources = src.from_ucf101(args.root, args.ucf101_splits, folds, args.val_share, args.seed)
    elif args.hmdb51_splits:
        sources = src.from_hmdb51(args.root, args.hmdb51_splits, folds, args.val_share, args.seed)
    elif args.csv:
        sources = src.from_kinetics_csv(args.csv, args.root)
    else:
        sources = src.from_class_folders(args.root, args.split)
    # Evaluation sets are scored on the picture alone, and about half of UCF-101 has no sound:
    # their split-file modes keep video-only videos (has_audio 0) rather than lose them.
    split_files = bool(args.ucf101_splits or args.hmdb51_splits)
    opts = PackOptions(fps=args.fps, short_side=args.short_side, codec=args.codec, crf=args.crf, speed=args.speed,
                       seg_frames=args.seg_frames, audio_rate=args.audio_rate, min_frames=args.min_frames,
                       allow_no_audio=args.allow_no_audio or split_files, max_lost_share=args.max_lost_share,
                       max_lost_seconds=args.max_lost_seconds)
    start = time.perf_counter()
    try:
        result = job.run(sources, args.out, opts, seed=args.seed, shard_bytes=args.shard_size,
                         shard_samples=args.shard_samples, workers=max(1, args.workers), part=args.part,
                         video_timeout=args.video_timeout)
    except StartError as e:
        print(f"stica-shard pack: {e}", file=sys.stderr)
        return 2
    packed = ", ".join(f"{split}: {n}" for split, n in result["packed"].items())
    stages = collections.Counter(f["stage"] for f in result["failures"])
    listed = sum(result["packed"].values()) + len(result["failures"])
    if result["transcoded"] < listed:  # videos listed in several splits (UCF-101's folds) are transcoded once
        print(f"transcoded {result['transcoded']} videos for {listed} split entries (the rest from the cache)")
    if result["concealed"]:
        print(f"{result['concealed']} video(s) packed with corrupt packets concealed: see 'concealed' in "
              f"{args.out}/manifest.json")
    if result["normalised"]:
        print("shown as a player shows them (see 'display' in each KEY.json): "
              + ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in sorted(result["normalised"].items())))
    print(f"packed {sum(result['packed'].values())} videos ({packed}); failed {len(result['failures'])}"
          + (f" ({', '.join(f'{k}: {n}' for k, n in sorted(stages.items()))}); see {args.out}/failures.jsonl"
             if stages else ""))
    packed_total = sum(result["packed"].values())
    if packed_total:
        seconds = time.perf_counter() - start
        print(f"{seconds:.1f} s in this run, {packed_total / seconds:.2f} videos/s with {args.workers} workers "
              f"({packed_total / seconds / args.workers:.2f} per worker; a resumed run counts earlier shards too); "
              f"{result['shard_bytes'] / packed_total / 1e3:.0f} kB per video; "
              f"shards / sources = {result['shard_bytes'] / max(1, result['source_bytes']):.3f}")
    if args.part:
        print(f"part {args.part[0]}/{args.part[1]} complete; once every part is, run: stica-shard merge {args.out}")
    return 1 if result["failures"] else 0


def merge(args) -> int:
    from stica.tools import pack as job

    result = job.merge(args.dir)
    print(f"merged {result['parts']} parts: {', '.join(f'{k}: {n}' for k, n in result['packed'].items())} videos; "
          f"failed {result['failures']}; wrote {args.dir}/manifest.json")
    return 1 if result["failures"] else 0


def verify(args) -> int:
    from stica.tools.verify import verify as run_verify

    problems = run_verify(args.dir, device=args.device, sources=args.sources)
    for p in problems:
        print(p)
    print(f"verify {args.dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"pack": pack, "merge": merge, "verify": verify}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
