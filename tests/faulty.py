"""Jobs that fail the ways a decoder does (tests/test_supervise.py): importable by worker processes."""
import os
import signal
import time
from pathlib import Path


def job(arg):
    """(n, fault, marker): n squared, unless the fault strikes: `kill` SIGKILLs the worker every
    time, `kill-once` only the first time (a marker file remembers), `hang` never returns."""
    n, fault, marker = arg
    if fault == "kill" or (fault == "kill-once" and not Path(marker).exists()):
        if marker:
            Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "hang":
        time.sleep(3600)
    return n * n, os.getpid()
