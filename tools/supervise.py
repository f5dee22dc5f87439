"""A process pool that loses one job, not the run, when a worker dies or hangs.

`multiprocessing.Pool.imap` waits forever for a task whose worker was killed (the OOM killer, a
segfault in a decoder), and nothing bounds a task's time. `concurrent.futures`'
ProcessPoolExecutor notices a dead worker, but then fails every task in flight and the pool
with them, so it cannot say which input killed it. Here each worker holds one job at a time
over its own pipe, so the parent always knows which job a worker held when it died or stalled:
that job is retried once in a fresh worker, then reported, and the pool goes on.
"""
from __future__ import annotations

import multiprocessing
import signal
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Callable, Iterable, Iterator


class StartError(RuntimeError):
    """The workers could not start at all (not one job's fault)."""


def _serve(fn, conn):
    conn.send(("ready", None))
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(("done", fn(job[1])))


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        return f"worker died: {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"worker died: exit code {exitcode}"


class _Worker:
    def __init__(self, ctx, fn, start_timeout: float):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(fn, child), daemon=True)
        self.process.start()
        child.close()
        self.job, self.started = None, 0.0
        # A worker that cannot start (a fork server that cannot re-import a script read on
        # stdin, a broken environment) dies here, before any job is its fault.
        try:
            started = self.conn.poll(start_timeout) and self.conn.recv()[0] == "ready"
        except EOFError:
            started = False
        if not started:
            self.process.kill()
            self.process.join()
            raise StartError(f"a worker process did not start ({_death(self.process.exitcode)}, "
                             f"{ctx.get_start_method()} start method). Worker processes re-import the main "
                             f"module: a script needs its work under `if __name__ == \"__main__\":`, and one "
                             f"read on stdin (python - <<EOF) must be saved to a file first")

    def give(self, index: int, job):
        self.job, self.started = index, time.monotonic()
        self.conn.send((index, job))

    def stop(self):
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def supervised_map(fn: Callable, jobs: Iterable, workers: int, timeout: float, lost: Callable, start_method: str,
                   start_timeout: float = 60.0) -> Iterator:
    """fn(job) for every job, in job order, on `workers` processes. A job whose worker dies is
    retried once in a fresh worker; if that one dies too, lost(job, {"stage": "worker", "reason":
    "worker died: SIGKILL (out of memory?)"}) stands in for its result. A job still running after
    `timeout` seconds has its worker killed and replaced, and lost(job, {"stage": "timeout", ...})
    stands in. The caller's results stay in order, so a journal written from them stays
    consistent."""
    ctx = multiprocessing.get_context(start_method)
    jobs = list(jobs)
    todo = deque(range(len(jobs)))
    tries = [0] * len(jobs)
    done: dict[int, object] = {}
    pool = [_Worker(ctx, fn, start_timeout) for _ in range(min(workers, len(jobs)))]
    following = 0
    try:
        while following < len(jobs):
            for k, w in enumerate(pool):
                if w.job is None and todo:
                    if not w.process.is_alive():  # died while idle: no job was its fault
                        w.stop()
                        pool[k] = w = _Worker(ctx, fn, start_timeout)
                    i = todo.popleft()
                    tries[i] += 1
                    w.give(i, jobs[i])
            busy = [w for w in pool if w.job is not None]
            deadline = min(w.started for w in busy) + timeout
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy],
                         timeout=max(0.0, deadline - time.monotonic()))
            for k, w in enumerate(pool):
                if w.job is None:
                    continue
                if w.conn in ready:
                    try:
                        _, result = w.conn.recv()
                        done[w.job], w.job = result, None
                        continue
                    except EOFError:  # the pipe closed under a dying worker: its exit code says how
                        w.process.join()
                if not w.process.is_alive():
                    w.process.join()
                    i = w.job
                    if tries[i] < 2:
                        todo.appendleft(i)
                    else:
                        done[i] = lost(jobs[i], {"stage": "worker", "reason": _death(w.process.exitcode)})
                    w.stop()
                    pool[k] = _Worker(ctx, fn, start_timeout)
                elif time.monotonic() - w.started >= timeout:
                    done[w.job] = lost(jobs[w.job], {"stage": "timeout",
                                                     "reason": f"no result after {timeout:g} s: worker replaced"})
                    w.stop()
                    pool[k] = _Worker(ctx, fn, start_timeout)
            while following in done:
                yield done.pop(following)
                following += 1
    finally:
        for w in pool:
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.stop()
