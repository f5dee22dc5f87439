import signal
import subprocess
import time

import numpy as np
import pytest


SIZE = (96, 72)


def make_clip(path, seconds=2.0, fps=30.0, value=lambda t: int(40 + 80 * t) % 256, freq=440.0, audio=True, **kw):
    # PyAV imported here, not above: gpu-check's first part runs the gpu tests where it is not installed.
    from stica.tools.synth import gray_frame, tone, uniform_times, write_av

    return write_av(path, lambda t: gray_frame(value(t), SIZE), uniform_times(seconds, fps),
                    tone(freq) if audio else None, size=SIZE, **kw)


@pytest.fixture
def class_tree(tmp_path):
    """Two classes of good clips in mixed containers, plus one bad input of each kind the packer reports."""
    root = tmp_path / "videos"
    for c, (label, suffix, freq) in enumerate([("drums", ".mp4", 300.0), ("flute", ".webm", 900.0)]):
        (root / label).mkdir(parents=True)
        for i in range(3):
            make_clip(root / label / f"{label}{i}{suffix}", seconds=1.5 + 0.5 * i, freq=freq, fps=25.0 + 5 * c)
    bad = root / "flute"
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "notes.txt").write_text("not a video")
    make_clip(bad / "short.mp4", seconds=0.5)
    make_clip(bad / "silent.mp4", audio=False)
    return root


def pack_demo_corpus(root, train, val):
    """The demo's synthetic audio-visual corpus, packed at short side 64: small real shards."""
    from stica.tools.demo import make_corpus
    from stica.tools.shard import main as shard_main

    csv_path = make_corpus(root / "videos", train=train, val=val)
    shard_main(["pack", "--root", str(root / "videos"), "--csv", str(csv_path), "--out", str(root / "shards"),
                "--short-side", "64", "--workers", "2"])
    return root / "shards"


CHIRP = lambda t: 200 + 400 * t  # Hz: the tone's pitch encodes time, as the frame's gray level does
# Gray level of frame i: 8 levels a step (wrapping every 28 frames), so a frame off by one is off
# by 8 levels or more, far outside the 2-3 levels that compression and conversion allow.
level = lambda i: 16 + (8 * i) % 224


def chirp(t):
    return 0.5 * np.sin(2 * np.pi * (200 * t + 200 * t ** 2))  # instantaneous frequency CHIRP(t)


def pack_timecoded(root, short_side: int, codec: str = "vp9", size=(96, 72), seconds: float = 4.0):
    """Classes a and b of 4 time-coded videos each (frame i is flat gray level(i), the sound a chirp
    whose pitch encodes time), packed 3 per shard."""
    from stica.tools.shard import main as shard_main
    from stica.tools.synth import write_av

    for c in ("a", "b"):
        (root / "videos" / c).mkdir(parents=True)
        for i in range(4):
            write_av(root / "videos" / c / f"{c}{i}.mkv", lambda t: np.full((size[1], size[0], 3), level(round(t * 30)), np.uint8),
                     [j / 30 for j in range(int(seconds * 30))], chirp, size=size)
    shard_main(["pack", "--root", str(root / "videos"), "--out", str(root / "shards"), "--short-side", str(short_side),
                "--codec", codec, "--shard-samples", "3", "--workers", "2"])
    return root / "shards"


def kill_after_log_lines(cmd, run_dir, lines: int, env=None, timeout: float = 300):
    """Start a training command and SIGKILL it once its log.jsonl holds `lines` lines (a crash at
    an arbitrary point, not a clean stop)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = run_dir / "log.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= lines:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def damage(shards, index: int) -> str:
    """Zero the first bytes of every video segment of one sample, in place: the tar and its index
    stay valid, and no clip of that sample decodes."""
    from stica.shards import parse_info, read_index, shard_paths

    tars, idxs = shard_paths(shards, "train")
    key, members = read_index(idxs[0])[index]
    with open(tars[0], "r+b") as f:
        f.seek(members["info"][0])
        _, offsets = parse_info(f.read(members["info"][1]))
        for start in offsets[:-1]:
            f.seek(members["segs"][0] + int(start))
            f.write(bytes(64))
    return key
