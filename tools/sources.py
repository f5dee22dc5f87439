"""What to pack: Kinetics annotation CSVs or a plain class-folder tree -> Source records."""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    path: str
    key: str  # sample key in the shards: letters, digits, '_' and '-' (DALI splits on the first dot)
    label: str
    split: str


def clean_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _files_by_stem(root: Path) -> dict[str, Path]:
    """One walk of the tree; Kinetics copies put videos in class folders or flat, with any extension."""
    found = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            found.setdefault(p.stem, p)
    return found


def from_kinetics_csv(csv_paths: list[str | Path], root: str | Path) -> list[Source]:
    """Rows `label,youtube_id,time_start,time_end[,split]`; a CSV without a split column names
    the split after its file (train.csv -> train). A row whose video is absent still becomes
    a Source, so the packer reports it as missing instead of dropping it."""
    root = Path(root)
    files = _files_by_stem(root)
    sources = []
    for csv_path in csv_paths:
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                stem = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
                label = row.get("label", "") or ""
                path = files.get(stem, root / label / f"{stem}.mp4")
                split = row.get("split") or Path(csv_path).stem
                sources.append(Source(str(path), clean_key(stem), label, split))
    return sources


def from_class_folders(root: str | Path, split: str) -> list[Source]:
    root = Path(root)
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class folders found")
    return [Source(str(p), clean_key(p.stem), d.name, split)
            for d in classes for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".")]


def class_list(sources: list[Source]) -> list[str]:
    return sorted({s.label for s in sources if s.label})
