"""Packing survives workers that die or hang: the supervised pool on its own, then stica-shard."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stica.shards import load_manifest
from stica.tools.supervise import StartError, supervised_map

from conftest import make_clip
import faulty


def lost(job, failure):
    return job[0], failure


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_dead_or_stuck_worker_costs_only_its_job_and_results_keep_their_order(tmp_path, method):
    """Job 2 kills its worker every time: retried once in a fresh worker, then reported with the
    signal. Job 4 kills its worker once: the retry packs it. Job 6 hangs: reported after the
    time limit, its worker replaced. Every other job returns, in order, and the pool ends."""
    faults = {2: "kill", 4: "kill-once", 6: "hang"}
    jobs = [(n, faults.get(n), str(tmp_path / f"marker{n}") if n in (2, 4) else None) for n in range(10)]
    t = time.monotonic()
    out = list(supervised_map(faulty.job, jobs, 2, 3.0, lost, method))
    assert time.monotonic() - t < 60
    assert [r[0] for r in out] == [n * n if n not in (2, 6) else n for n in range(10)]
    assert out[2][1] == {"stage": "worker", "reason": "worker died: SIGKILL (out of memory?)"}
    assert out[6][1]["stage"] == "timeout" and "3 s" in out[6][1]["reason"]
    assert isinstance(out[4][1], int)  # a pid: the retry ran
    workers = {r[1] for n, r in enumerate(out) if n not in (2, 6)}
    assert len(workers) >= 3  # the dead and the stuck workers were replaced


def test_workers_that_cannot_start_are_a_clear_error_not_a_hang(tmp_path):
    """The fork server re-imports the main module; a script read on stdin has none to import."""
    script = ("import numpy, torch\n"  # threads: the packer picks a fork server, as it did in the report
              "from stica.tools.supervise import supervised_map\n"
              "print(list(supervised_map(abs, [-1, -2], 2, 10.0, None, 'forkserver')))\n")
    out = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert out.returncode != 0
    assert "did not start" in out.stderr and "must be saved to a file" in out.stderr, out.stderr[-1000:]
    with pytest.raises(StartError):
        raise StartError("type check")


def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # gone since it was listed
        return ""


def pool_workers(pid: int) -> list[int]:
    """The packer's pool workers: the fork server's children where there is one (before it forks,
    the fork server and the resource tracker have no children either, and killing them is
    another test: a pool that cannot start), else the packer's children but the resource tracker."""
    kids = children(pid)
    servers = [c for c in kids if "forkserver" in cmdline(c)]
    if servers:
        return [w for server in servers for w in children(server)]
    return [c for c in kids if "resource_tracker" not in cmdline(c)]


def test_packing_survives_a_killed_worker_and_a_stuck_one(tmp_path):
    """stica-shard pack --workers 2 on 24 videos: a few seconds in, one worker is SIGKILLed (as the
    OOM killer does) and another SIGSTOPped (a decoder that never returns). The job ends by itself:
    the killed worker's video is retried and packed, the stuck one's reported as a timeout, and
    every other video packed."""
    root = tmp_path / "videos" / "c"
    root.mkdir(parents=True)
    for i in range(24):
        make_clip(root / f"v{i:02d}.mp4", seconds=3.0)
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "stica.tools.shard", "pack", "--root", str(root.parent), "--out", str(out),
           "--workers", "2", "--short-side", "64", "--shard-samples", "3", "--video-timeout", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = lambda: pool_workers(proc.pid)
    deadline = time.time() + 60
    while len(workers()) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)
    first = workers()
    os.kill(first[0], signal.SIGKILL)
    os.kill(first[1], signal.SIGSTOP)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-2000:]  # one failure: the stuck video
    failures = [json.loads(l) for l in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["stage"] for f in failures] == ["timeout"] and "10 s" in failures[0]["reason"]
    assert load_manifest(out)["splits"]["train"]["samples"] == 23  # the killed worker's video was retried
    assert "packed 23 videos (train: 23); failed 1 (timeout: 1)" in stdout
