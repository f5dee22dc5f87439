"""`stica-export CHECKPOINT --out DIR`: a pretraining checkpoint as weights other code loads.

The video trunk is written under torchvision's `r2plus1d_18` names, so downstream code built on
torchvision loads it with `strict=False` (only the classifier `fc.*` is missing); the audio trunk
and the pooling + projection heads go to files of their own, and `export.json` says where they
came from.

    video_r2plus1d_18.pt   stem.*, layer1.0.conv1.0.0.weight, ..., layer4.1.conv2.1.*
    audio_resnet9.pt       the audio trunk (stica.model.ResNet9Audio names)
    pooling_heads.pt       pool.*, video_head.*, audio_head.* (stica.model.Stica names)
    export.json            checkpoint path and SHA-256, step, epoch, config, files
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import torch

from stica.config import HelpFormatter
from stica.model import R2Plus1D18

TORCHVISION_MODEL = "r2plus1d_18"


class ExportError(Exception):
    """A checkpoint that cannot be written in torchvision's layout, with the reason."""


def torchvision_name(key: str) -> str:
    """`video.stem.0.weight` -> `stem.0.weight`; `video.stages.2.0.downsample.0.weight` ->
    `layer3.0.downsample.0.weight`. Inside a block the two layouts already agree (conv1/conv2 as
    (2+1)D pair + BN, downsample as 1x1x1 conv + BN), as do the stem's indices."""
    key = key.removeprefix("video.")
    return re.sub(r"^stages\.(\d+)\.", lambda m: f"layer{int(m.group(1)) + 1}.", key)


def video_trunk_state(model_state: dict, width: float) -> dict:
    """The video trunk's tensors under torchvision's names, checked against the full-width trunk."""
    if width != 1.0:
        raise ExportError(f"model.width={width}: torchvision's r2plus1d_18 has the full-width trunk (model.width=1.0) "
                          f"only; a narrower trunk has other tensor shapes")
    video = {k: v for k, v in model_state.items() if k.startswith("video.")}
    expected = {torchvision_name("video." + k): v.shape for k, v in R2Plus1D18(1.0).state_dict().items()}
    state = {torchvision_name(k): v for k, v in video.items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or extra or wrong:
        raise ExportError(f"the video trunk does not map onto r2plus1d_18: missing {missing[:5]}, unexpected "
                          f"{extra[:5]}, other shapes {wrong[:5]}")
    return state


def export(checkpoint: Path, out: Path) -> dict:
    try:
        blob = checkpoint.read_bytes()
    except OSError as e:
        raise ExportError(f"cannot read it ({e.strerror})") from None
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ExportError("not a stica checkpoint (no 'model' and 'config' entries)")
    model, cfg = state["model"], state["config"]
    video = video_trunk_state(model, cfg["model"]["width"])
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "video_r2plus1d_18.pt": video,
        "audio_resnet9.pt": {k.removeprefix("audio."): v for k, v in model.items() if k.startswith("audio.")},
        "pooling_heads.pt": {k: v for k, v in model.items() if k.split(".")[0] in ("pool", "video_head", "audio_head")},
    }
    for name, tensors in files.items():
        torch.save(tensors, out / name)
    provenance = {
        "checkpoint": str(checkpoint.resolve()), "sha256": hashlib.sha256(blob).hexdigest(),
        "step": state.get("step"), "epoch": (state.get("loader") or {}).get("epoch"),
        "samples_seen": state.get("samples_seen"), "torchvision_model": TORCHVISION_MODEL,
        "missing_when_loaded_into_torchvision": ["fc.weight", "fc.bias"],
        "files": {name: len(tensors) for name, tensors in files.items()}, "config": cfg,
    }
    (out / "export.json").write_text(json.dumps(provenance, indent=1))
    return provenance


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stica-export", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a stica checkpoint (checkpoint.pt or epoch-NNN.pt)")
    parser.add_argument("--out", type=Path, required=True, help="the directory the files are written to")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        p = export(args.checkpoint, args.out)
    except ExportError as e:
        print(f"stica-export: {args.checkpoint}: {e}", file=sys.stderr)
        return 1
    print(f"stica-export: step {p['step']} (epoch {p['epoch']}) of {args.checkpoint} -> {args.out}: "
          + ", ".join(f"{n} ({k} tensors)" for n, k in p["files"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
