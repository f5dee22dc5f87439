"""Audio-only evaluation sets (Table 6), read straight from their files: ESC-50 and DCASE2014
scene classification. No shards: these sets are a few thousand short clips, and a picture-less
sample does not fit the shard contract. Each clip becomes the log-mel spectrograms of its
consecutive windows of the training length, computed as the training pipeline does."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import torch

from stica.media import decode_audio_file
from stica.pipelines.reference import log_mel, mel_filters


def esc50(root: str | Path) -> list[tuple[Path, str, int]]:
    """ESC-50 as released: root/audio/*.wav and root/meta/esc50.csv (filename, fold, target,
    category, ...). Returns (path, category, fold) per clip; the folds are the published five."""
    root = Path(root)
    table = root / "meta" / "esc50.csv"
    if not table.exists():
        raise FileNotFoundError(f"{table}: ESC-50 metadata not found (expected ROOT/meta/esc50.csv, ROOT/audio/)")
    with open(table, newline="") as f:
        return [(root / "audio" / r["filename"], r["category"], int(r["fold"])) for r in csv.DictReader(f)]


def dcase2014(root: str | Path, folds: int = 5) -> list[tuple[Path, str, int]]:
    """DCASE2014 scene classification (development set): root/<scene><NN>.wav, 10 recordings of
    30 s per scene, the scene named by the file's letters (bus01.wav -> bus). Folds are
    stratified by recording number: NN 1-2 -> fold 1, 3-4 -> fold 2, ... (the challenge's
    5-fold cross-validation over the development set; this split is stated, not downloaded)."""
    clips = []
    for path in sorted(Path(root).glob("*.wav")):
        m = re.fullmatch(r"([A-Za-z_]+?)_?(\d+)", path.stem)
        if not m:
            raise ValueError(f"{path}: expected <scene><number>.wav (e.g. bus01.wav)")
        number = int(m.group(2))
        clips.append((path, m.group(1), (number - 1) * folds // 10 % folds + 1))
    if not clips:
        raise FileNotFoundError(f"{root}: no <scene><number>.wav files (DCASE2014 scene classification)")
    return clips


AUDIO_SETS = {"esc50": esc50, "dcase2014": dcase2014}


def clip_spectrograms(path: Path, audio_cfg, seconds: float) -> torch.Tensor:
    """The clip cut into consecutive windows of `seconds` (the last one padded with silence):
    N x 1 x n_mels x frames log-mel spectrograms, as the pretraining graph computes them."""
    audio = torch.from_numpy(decode_audio_file(path, audio_cfg.rate))
    n = round(seconds * audio_cfg.rate)
    windows = max(1, int(np.ceil(len(audio) / n)))
    audio = torch.nn.functional.pad(audio, (0, windows * n - len(audio)))
    filters = mel_filters(audio_cfg.n_mels, audio_cfg.nfft, audio_cfg.rate)
    return torch.stack([log_mel(w, audio_cfg, filters) for w in audio.split(n)])
