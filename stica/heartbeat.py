"""Per-rank heartbeats in the run directory, so a person or a script can see which rank stopped.

    python -m stica.heartbeat runs/k400-stica        # one line per rank: step, age, verdict

A thread writes RUN/heartbeat/rank-NNNNN.json (rank, host, pid, restart, step, when the step last
advanced, when it was written) every `comm.heartbeat_s` seconds. A SIGSTOPped, swapping or vanished
rank stops writing; a rank stuck inside a collective keeps writing but its step stops advancing.
Both show here on any backend, where gloo's timeout names no peer ("Timed out waiting 10000ms for
recv operation") and NCCL's flight recorder needs its dumps analysed first.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path


class Heartbeat:
    """Context manager around a run: beats while it lasts; on an exception (a collective that timed
    out, a peer that went away) prints which ranks went silent, then lets the exception through so
    torchrun sees a failed worker."""

    def __init__(self, run_dir: Path, rank: int, world: int, every: float):
        self.dir, self.rank, self.world, self.every = Path(run_dir) / "heartbeat", rank, world, every
        self.dir.mkdir(parents=True, exist_ok=True)
        self.step, self.step_time = 0, time.time()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stica-heartbeat", daemon=True)

    def advance(self, step: int):
        """Called once a step: two attribute writes, no I/O on the training thread."""
        self.step, self.step_time = step, time.time()

    def __enter__(self):
        self._write("running")
        self._thread.start()
        return self

    def __exit__(self, kind, error, tb):
        self._done.set()
        self._thread.join()
        self._write("done" if kind is None else "failed")
        if kind is not None and self.world > 1 and not issubclass(kind, (KeyboardInterrupt, SystemExit)):
            print(f"[stica.train] rank {self.rank} failed at step {self.step} ({kind.__name__}: "
                  f"{str(error).splitlines()[0] if str(error) else ''}); heartbeats in {self.dir}:\n"
                  f"{report(self.dir.parent, self.world, self.every)}", file=sys.stderr, flush=True)
        return False

    def _run(self):
        while not self._done.wait(self.every):
            self._write("running")

    def _write(self, state: str):
        record = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
                  "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)), "step": self.step,
                  "step_time": self.step_time, "time": time.time(), "every": self.every, "state": state}
        path = self.dir / f"rank-{self.rank:05d}.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)  # a reader never sees half a file


def read(run_dir: Path) -> dict[int, dict]:
    beats = {}
    for path in sorted((Path(run_dir) / "heartbeat").glob("rank-*.json")):
        record = json.loads(path.read_text())
        beats[record["rank"]] = record
    return beats


def verdicts(run_dir: Path, world: int | None = None, every: float | None = None, now: float | None = None) -> dict:
    """rank -> (record or None, verdict): `silent` (no beat for 3 periods: stopped, swapping or its
    host gone), `stalled` (beating, but its step has not moved for 3 periods while another rank's
    has gone further), `missing` (never wrote), or `ok`/`done`/`failed`."""
    beats, now = read(run_dir), time.time() if now is None else now
    world = world if world is not None else max(beats, default=-1) + 1
    front = max((b["step"] for b in beats.values()), default=0)
    out = {}
    for rank in range(world):
        b = beats.get(rank)
        if b is None:
            out[rank] = (None, "missing")
            continue
        late = 3 * (every or b["every"]) + 1
        if b["state"] != "running":
            out[rank] = (b, b["state"])
        elif now - b["time"] > late:
            out[rank] = (b, "silent")
        elif now - b["step_time"] > late and b["step"] < front:
            out[rank] = (b, "stalled")
        else:
            out[rank] = (b, "ok")
    return out


def report(run_dir: Path, world: int | None = None, every: float | None = None) -> str:
    now, lines = time.time(), []
    for rank, (b, verdict) in verdicts(run_dir, world, every, now).items():
        if b is None:
            lines.append(f"  rank {rank}: no heartbeat file")
            continue
        note = {"silent": "  <- no heartbeat: stopped, swapping or its host gone",
                "stalled": "  <- its step stopped advancing"}.get(verdict, "")
        lines.append(f"  rank {rank} ({b['host']} pid {b['pid']}, restart {b['restart']}): step {b['step']}, "
                     f"step advanced {now - b['step_time']:.0f} s ago, last beat {now - b['time']:.0f} s ago, "
                     f"{verdict}{note}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from stica.config import HelpFormatter

    parser = argparse.ArgumentParser(prog="python -m stica.heartbeat", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run's directory (run.dir)")
    parser.add_argument("--world", type=int, default=None, help="ranks to expect (unset: the highest rank seen + 1)")
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    if not (args.run_dir / "heartbeat").is_dir():
        raise SystemExit(f"{args.run_dir / 'heartbeat'}: no heartbeats (not a run directory, or it never started)")
    print(report(args.run_dir, args.world))
