"""The --gpu-check parts that need nothing but torch, pytest and the project's pure-Python
dependencies: the step's verdict must not wait for DALI's 200 MB of wheels."""
from __future__ import annotations

import importlib
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from stica.config import load_config
from stica.tools.bench_model import STICA, measure_step, table_1f
from stica.tools.measure import DEFAULT_CONFIG

REPO = Path(__file__).resolve().parents[1]


def missing(*modules: str) -> list[str]:
    """Those of `modules` that do not import here."""
    out = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(name)
    return out


def gpu_tests(out: Path, timeout: float, before: dict | None = None) -> dict:
    """pytest -m gpu; given an earlier result, only the tests that did not pass then run again."""
    xml = out / "gpu_tests.xml"
    kept = [c for c in (before or {}).get("cases", []) if c["outcome"] == "passed"]
    deselect = [arg for c in kept for arg in ("--deselect", c["nodeid"])]
    # Without DALI or PyAV, the test modules that import them fail to collect: the others still run.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", f"--junitxml={xml}", *deselect, "tests"], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    with open(out / "gpu_tests.log", "a") as log:
        log.write(proc.stdout + proc.stderr)
    if not xml.exists():
        raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {proc.stderr[-500:]}")
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome, detail = {"failure": "failed"}.get(kind, kind), (node.get("message") or "")[:300]
        nodeid = case.get("classname").replace(".", "/") + ".py::" + case.get("name")
        cases.append({"test": case.get("name"), "nodeid": nodeid, "outcome": outcome, "detail": detail,
                      "seconds": float(case.get("time", 0))})
    cases = kept + cases
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"exit_code": proc.returncode, **counts, "cases": cases,
            "dali": not missing("nvidia.dali")}  # without it, gpu_tests_dali reruns the rest once it is installed


def step_levers(preset: dict, device, amp) -> list[dict]:
    """The STiCA step (the paper's crops, transformer pooling, bf16, channels-last, model only) with
    each lever the trainer has: model.conv (conv3d | conv2d, eager), then train.compile (trunks,
    heads, all) with the faster conv. Which conv is faster decides its default."""
    strategy = next(s for s in table_1f() if s.name == STICA)
    rows = []

    def row(overrides):
        cfg = load_config(DEFAULT_CONFIG, [f"model.width={preset['width']}", *overrides])
        m = measure_step(cfg, strategy, preset["batch"], preset["frames"], preset["size"], device, amp,
                         preset["repeats"], preset["steps"], preset["warmup"])
        rows.append({"conv": cfg.model.conv, "compile": cfg.train.compile, "batch": preset["batch"],
                     "step_s": m["step_s"]["median"], "step_s_min": m["step_s"]["min"],
                     "step_s_max": m["step_s"]["max"], "ops": sum(m["ops"].values()) if m["ops"] else None})
        print(f"[gpu-check] step conv={rows[-1]['conv']} compile={rows[-1]['compile']}: "
              f"{rows[-1]['step_s'] * 1000:.1f} ms", flush=True)

    for conv in ("conv3d", "conv2d"):
        row([f"model.conv={conv}"])
    faster = min(rows, key=lambda r: r["step_s"])["conv"]
    for regions in ("trunks", "heads", "all"):
        row([f"model.conv={faster}", f"train.compile={regions}"])
    return rows
