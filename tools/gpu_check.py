"""`stica-bench --gpu-check [--budget SECONDS]`: the GPU path proven by one command on one GPU,
its parts run in order of what they decide, so that a GPU rented by the minute answers the
questions that matter first.

1. Torch only (tools/gpu_torch.py; no DALI, PyAV or spdl-io needed, so the step's verdict does
   not wait for 200 MB of wheels): the gpu tests that need nothing more, the model table
   (Table 1f's strategies, bf16, ops and FLOPs) at batch 8 and 32 with the largest batch, the
   STiCA step's levers (model.conv, train.compile).
2. On shards (tools/gpu_loader.py): the loader in nvdec, mixed, hybrid and cpu modes beside the
   reference loader, the hybrid loader's CPU time per clip by part, NVDEC's smallest frame and
   clip cost, the nvdec mode's session sweep, the trainer end to end, the trainer at batch
   8/32/largest eager and compiled, and the gpu tests that needed DALI.

report.md and results.json are written after every part, so a run cut short by its budget, a
time limit or a crash keeps every finished part's figures. With `--budget`, a part whose time
(measured by an earlier run on this GPU, else its estimate below) does not fit what is left is
not started; the report lists the parts left out and the `--parts` call that finishes them,
merged into the same report. A part that raises is reported with its error and the rest run.
Without a GPU it runs what it can, exits 0 and lists what it skipped.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from stica.tools import gpu_loader, gpu_report, gpu_torch
from stica.tools.bench_model import STICA, run_model
from stica.tools.measure import KINETICS_TRAIN, device_name, write_csv

REPO = Path(__file__).resolve().parents[1]
WORK = Path(tempfile.gettempdir()) / "stica-gpu-check"  # fixed: a later --parts call finds the videos and shards


class Skip(Exception):
    """A part that cannot run on this machine, with the reason."""


@dataclass(frozen=True)
class Part:
    name: str
    run: Callable[["Check"], object]
    estimate_s: float  # on an H100, for --budget until a run measures it (the 2026-11-26 session, else a guess)
    gpu: bool = False  # needs a CUDA GPU
    modules: tuple[str, ...] = ()  # imported by the part: a missing one skips it, saying so
    shards: bool = False  # reads the generated shards (the shards part runs first)


@dataclass
class Check:
    out: Path
    preset: dict
    gpu: bool
    device: torch.device
    results: dict


def model_tables(c: Check) -> list[dict]:
    """Batch 8 (the paper's per-GPU batch) with the largest batch for Default and STiCA, then 32."""
    rows = run_model(c.preset, c.device, torch.bfloat16, KINETICS_TRAIN, largest_for=("Default", STICA))
    return rows + run_model({**c.preset, "batch": 32}, c.device, torch.bfloat16, KINETICS_TRAIN, largest_for=())


def shards(c: Check) -> str:
    return str(gpu_loader.make_shards(WORK, videos=96 if c.gpu else 16, seconds=6.0 if c.gpu else 3.0))


def nvdec_part(c: Check) -> list[dict]:
    h264 = gpu_loader.make_shards(WORK, videos=96, seconds=6.0, codec="h264")
    rows = gpu_loader.nvdec_sessions(Path(c.results["shards"]), h264, batches=20, repeats=3)
    best = max((r for r in rows if r["codec"] == "vp9"), key=lambda r: r["clips_per_s"])
    c.results["end_to_end_nvdec"] = gpu_loader.run_end_to_end(
        c.results["shards"], dict(width=1.0, batch=8, e2e_steps=120, log_every=10), "dali",
        ["data.device=nvdec", f"data.sessions={best['sessions']}"])
    return rows


def end_to_end(c: Check) -> dict:
    e2e = dict(width=1.0, batch=8, e2e_steps=120, log_every=10) if c.gpu else \
        dict(width=0.125, batch=4, e2e_steps=4, log_every=1)
    return gpu_loader.run_end_to_end(c.results["shards"], e2e, "dali", ["data.device=auto"])


def cpu_side(c: Check) -> list[dict]:
    """Where the hybrid loader's CPU time goes, part by part, on as many threads as the loader rows."""
    from stica.tools.bench_loader import cpu_side as measure

    return measure(c.results["shards"], batch_size=8, threads=min(os.cpu_count() or 1, 8),
                   batches=20 if c.gpu else 2, repeats=3 if c.gpu else 1)


def rerun_gpu_tests(c: Check) -> dict:
    before = c.results.get("gpu_tests")
    if not isinstance(before, dict) or "cases" not in before:
        raise Skip("the gpu_tests part has not run")
    if before.get("dali"):
        raise Skip("the gpu_tests part ran with DALI installed")
    c.results["gpu_tests"] = gpu_torch.gpu_tests(c.out, timeout=300, before=before)
    return {"reran": sum(case["outcome"] != "passed" for case in before["cases"])}


LOADERS = ("av", "nvidia.dali")  # PyAV packs the shards, DALI reads them
PARTS = (  # in order of what they decide
    Part("gpu_tests", lambda c: gpu_torch.gpu_tests(c.out, timeout=300, before=c.results.get("gpu_tests")), 90),
    Part("model", model_tables, 200, gpu=True),
    Part("step_levers", lambda c: gpu_torch.step_levers(c.preset, c.device, torch.bfloat16), 240, gpu=True),
    Part("shards", shards, 60, modules=LOADERS),
    Part("loader", lambda c: gpu_loader.loader_modes(Path(c.results["shards"]), c.gpu, batches=20 if c.gpu else 2,
                                                     repeats=3 if c.gpu else 1), 90, modules=LOADERS, shards=True),
    Part("loader_cpu_side", cpu_side, 60, modules=LOADERS, shards=True),
    Part("nvdec_smallest_frame", lambda c: gpu_loader.nvdec_smallest_frame(), 20, gpu=True, modules=LOADERS),
    Part("clip_cost", lambda c: gpu_loader.clip_costs(Path(c.results["shards"]), c.gpu), 30, modules=LOADERS,
         shards=True),
    Part("nvdec", nvdec_part, 240, gpu=True, modules=LOADERS, shards=True),
    Part("end_to_end", end_to_end, 90, modules=LOADERS, shards=True),
    Part("end_to_end_batches", lambda c: gpu_loader.end_to_end_batches(c.results["shards"], c.results, c.gpu), 420,
         modules=LOADERS, shards=True),
    # The gpu tests that part 1 skipped for want of DALI, once it is here (those that passed are not rerun).
    Part("gpu_tests_dali", lambda c: rerun_gpu_tests(c), 120, modules=LOADERS),
)
NAMES = tuple(p.name for p in PARTS)


def _git_commit() -> str:
    if os.environ.get("STICA_COMMIT"):  # a copy of the tree without .git (a remote GPU machine)
        return os.environ["STICA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name, package in (("dali", "nvidia-dali-cuda120"), ("pyav", "av"), ("spdl_io", "spdl-io")):
        try:
            out[name] = version(package)
        except PackageNotFoundError:  # on the GPU machine DALI may be another CUDA build's package
            out[name] = None
    if out["dali"] is None:
        try:
            out["dali"] = __import__("nvidia.dali", fromlist=["__version__"]).__version__
        except ImportError:
            pass
    return out


def write(c: Check, final: bool = False):
    """results.json and report.md as they stand: after every part, so an interrupted run keeps them."""
    c.results["fastest_mode"] = gpu_loader.fastest_modes(c.results)
    if c.gpu:
        c.results["targets"] = gpu_report.targets(c.results)
    (c.out / "results.json").write_text(json.dumps(c.results, indent=1, default=str))
    (c.out / "report.md").write_text(gpu_report.markdown(c.results))
    if final:
        for name in ("model", "loader", "loader_cpu_side", "clip_cost", "nvdec", "nvdec_smallest_frame"):
            if isinstance(c.results.get(name), list):
                write_csv(c.results[name], c.out / f"{name}.csv")
        gpu_report.plot(c.results, c.out / "bench.png")


def main(out: Path, preset: dict, parts: tuple[str, ...] = NAMES, budget: float | None = None,
         catalogue: tuple[Part, ...] = PARTS) -> int:
    """preset: stica-bench's full model preset (batch 8 per GPU, repeats after warm-up).
    parts: a subset runs those alone, merged into out/results.json if it exists (same GPU).
    budget: seconds this call may take; parts that would not finish in what is left are left out."""
    names = tuple(p.name for p in catalogue)
    unknown = set(parts) - set(names)
    if unknown:
        raise SystemExit(f"stica-bench --gpu-check: unknown part(s) {sorted(unknown)}; parts are {', '.join(names)}")
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    t0 = time.perf_counter()
    header = {"device": device_name(device), "date": datetime.date.today().isoformat(), "commit": _git_commit(),
              "versions": _versions(), "cpu_cores": os.cpu_count()}
    earlier = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    if earlier and earlier["header"]["device"] == header["device"]:  # a later call on this GPU: merge into it
        results = {**earlier, "header": header, "left_out": []}
        results["skipped"] = [s for s in earlier["skipped"] if s.split(":")[0] not in parts]
        seconds_before = earlier.get("seconds", 0)
    else:
        results = {"header": header, "skipped": [], "left_out": [], "timings": {}}
        seconds_before = 0
    c = Check(out, preset, gpu, device, results)
    wanted = set(parts)
    if any(p.shards for p in catalogue if p.name in wanted) and not isinstance(results.get("shards"), str):
        wanted.add("shards")  # the parts on shards need them, made here or found from an earlier call
    for part in catalogue:
        if part.name not in wanted:
            continue
        missing = gpu_torch.missing(*part.modules)
        if part.gpu and not gpu:
            results["skipped"].append(f"{part.name}: needs a CUDA GPU")
            continue
        if missing:
            results["skipped"].append(f"{part.name}: {', '.join(missing)} not installed")
            continue
        if part.shards and not isinstance(results.get("shards"), str):
            results["skipped"].append(f"{part.name}: no shards")
            continue
        elapsed = time.perf_counter() - t0
        expected = results["timings"].get(part.name, part.estimate_s)
        if budget is not None and elapsed + expected > budget:
            results["left_out"].append({"part": part.name, "expected_s": expected})
            print(f"[gpu-check] {part.name} left out: about {expected:.0f} s, {budget - elapsed:.0f} s of the "
                  f"budget left", flush=True)
            write(c)
            continue
        print(f"[gpu-check] {part.name} ({elapsed:.0f} s so far"
              + (f", {budget - elapsed:.0f} s of the budget left)" if budget is not None else ")"), flush=True)
        start = time.perf_counter()
        try:
            results[part.name] = part.run(c)
        except Skip as e:
            results["skipped"].append(f"{part.name}: {e}")
        except Exception:  # report it and go on: one broken part must not hide the others' figures
            results[part.name] = {"traceback": traceback.format_exc()}
            print(f"[gpu-check] {part.name} FAILED:\n{results[part.name]['traceback']}", flush=True)
        results["timings"][part.name] = round(time.perf_counter() - start, 1)
        results["seconds"] = seconds_before + time.perf_counter() - t0
        write(c)
    if results["left_out"]:
        rest = ",".join(p["part"] for p in results["left_out"])
        results["finish_with"] = f"stica-bench --gpu-check --out {out} --parts {rest}"
    if not gpu:
        tests = results.get("gpu_tests")
        if isinstance(tests, dict) and tests.get("passed") == 0:
            results["skipped"].append("gpu tests: every one skipped (no CUDA GPU)")
        results["skipped"] += [
            "loader mixed and hybrid modes: need a CUDA GPU",
            "end to end at full width and >=100 steps: needs a CUDA GPU (ran 4 CPU steps)",
            "end to end at batch 8, 32 and the largest, eager and compiled: needs a CUDA GPU (ran batch 4 eager)",
            "targets (150 clips/s, data wait < 5%, feature crops <= 1.05x two RGB crops): GPU figures"]
    results["seconds"] = seconds_before + time.perf_counter() - t0
    write(c, final=True)
    print((out / "report.md").read_text())
    print(f"[gpu-check] wrote report.md, results.json, the CSVs and bench.png to {out}")
    return 0
