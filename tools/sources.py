"""What to pack: Kinetics annotation CSVs or a plain class-folder tree -> Source records."""
from __future__ import annotations

import csv
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    path: str
    key: str  # sample key in the shards: letters, digits, '_' and '-' (DALI splits on the first dot)
    label: str
    split: str


MAX_KEY = 64  # with ".segs" well inside tar's 100-byte name field: no GNU long-name member


def clean_key(name: str) -> str:
    """A file stem as a sample key DALI's webdataset reader can read: only letters, digits, '_'
    and '-' (it splits key and extension at the first dot, and its index separates fields by
    spaces) and at most MAX_KEY characters (it cannot read a GNU long-name member: one such name
    made a whole shard unreadable). A stem that had to change keeps its identity in a hash of the
    original, so 'a b' and 'a.b', or two names in another script, stay two keys; the original
    name is kept in the sample's JSON ('source')."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    if key == name and len(key) <= MAX_KEY:
        return key
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"{key[:MAX_KEY - 11]}-{digest}"


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


def _holdout(sources: list[Source], share: float, seed: int, split: str) -> list[Source]:
    """Move a class-stratified `share` of a training list to `split` (model selection happens
    there, never on the test set); the draw depends only on the seed and the list."""
    rng = random.Random(seed)
    out = []
    for label in sorted({s.label for s in sources}):
        members = [s for s in sources if s.label == label]
        held = set(rng.sample(range(len(members)), round(len(members) * share)))
        out += [Source(s.path, s.key, s.label, split if i in held else s.split) for i, s in enumerate(members)]
    return out


def from_ucf101(root: str | Path, split_dir: str | Path, folds: list[int], val_share: float = 0.1,
                seed: int = 0) -> list[Source]:
    """UCF-101: videos in root/<Class>/, splits in trainlist0N.txt ("Class/v_x.avi 12") and
    testlist0N.txt ("Class/v_x.avi"). Writes splits foldN-train, foldN-val, foldN-test."""
    root, split_dir = Path(root), Path(split_dir)
    sources = []
    for fold in folds:
        for kind in ("train", "test"):
            listing = split_dir / f"{kind}list{fold:02d}.txt"
            if not listing.exists():
                raise FileNotFoundError(f"{listing}: UCF-101 split file not found")
            entries = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
            part = [Source(str(root / e), clean_key(Path(e).stem), Path(e).parent.name, f"fold{fold}-{kind}")
                    for e in entries]
            sources += _holdout(part, val_share, seed + fold, f"fold{fold}-val") if kind == "train" else part
    return sources


def from_hmdb51(root: str | Path, split_dir: str | Path, folds: list[int], val_share: float = 0.1,
                seed: int = 0) -> list[Source]:
    """HMDB-51: videos in root/<class>/, splits in <class>_test_splitN.txt ("video.avi 1"):
    1 = train, 2 = test, 0 = not used in that split."""
    root, split_dir = Path(root), Path(split_dir)
    sources = []
    for fold in folds:
        listings = sorted(split_dir.glob(f"*_test_split{fold}.txt"))
        if not listings:
            raise FileNotFoundError(f"{split_dir}: no HMDB-51 split files *_test_split{fold}.txt")
        train = []
        for listing in listings:
            label = listing.name[: -len(f"_test_split{fold}.txt")]
            for line in listing.read_text().splitlines():
                if not line.strip():
                    continue
                name, tag = line.split()
                if tag == "0":
                    continue
                source = Source(str(root / label / name), clean_key(Path(name).stem), label,
                                f"fold{fold}-{'train' if tag == '1' else 'test'}")
                (train if tag == "1" else sources).append(source)
        sources += _holdout(train, val_share, seed + fold, f"fold{fold}-val")
    return sources
