"""stica-bench's quick preset on generated shards: files, tables and the GPU-hours arithmetic."""
import csv
import json

import pytest
import torch

from stica.media import decoder_missing
from stica.tools.bench import main as bench_main
from conftest import pack_demo_corpus


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return pack_demo_corpus(tmp_path_factory.mktemp("bench"), train=12, val=0)


def test_quick_preset_writes_tables_and_gpu_hours_follow_from_measured_time(shards, tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench_main(["--quick", "--shards", str(shards), "--out", str(out), "--manifest",
                       str(shards / "manifest.json")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset_size"] == 12 and results["preset"] == "quick"
    model = list(csv.DictReader(open(out / "model.csv")))
    assert len(model) == 24  # 8 strategies x (average, transformer, transformer + positional) pooling
    for row in results["model"]:
        assert row["clips_per_s"] == pytest.approx(row["batch"] / row["step_s"])
        assert row["gpu_hours_per_epoch"] == pytest.approx(12 / row["clips_per_s"] / 3600)
        assert row["step_s_min"] <= row["step_s"] <= row["step_s_max"]
    defaults = [r for r in results["model"] if r["strategy"].startswith("Default")]
    assert [r["relative_to_default"] for r in defaults] == [1.0, 1.0, 1.0]
    paper = {r["strategy"]: r["paper_gpu_hours_v100"] for r in results["model"] if r["pooling"] == "average"}
    assert paper["Feature crops (2x6^2 + 4x4^2, 2x3 + 1x2)"] == 30.0 and paper["Default (1x112^2)"] == 17.3
    loader = list(csv.DictReader(open(out / "loader.csv")))
    measured = {("dali", "1"), ("dali", "2"), ("reference", "1"), ("reference", "2")}
    for peer in ("torchcodec", "spdl"):
        if not decoder_missing(peer):
            measured |= {(peer, "1"), (peer, "2")}
    assert {(r["backend"], r["threads_or_workers"]) for r in loader if r["clips_per_s"]} == measured
    assert all(float(r["clips_per_s"]) > 0 for r in loader if r["clips_per_s"])
    assert [r["start"] for r in results["clip_cost"]] == [0, 135, 270]
    assert all(r["ms_per_clip"] > 0 for r in results["clip_cost"]) and (out / "clip_cost.csv").exists()
    e2e = results["end_to_end"]
    assert e2e["clips_per_s"] > 0 and e2e["bound_by"] in ("loader", "model")
    report = (out / "report.md").read_text()
    assert "| average | Feature crops (2x6^2 + 4x4^2, 2x3 + 1x2) |" in report
    assert report in capsys.readouterr().out
    assert (out / "bench.png").stat().st_size > 10_000


def test_gpu_check_without_a_gpu_runs_what_it_can_and_lists_what_it_skipped(tmp_path):
    out = tmp_path / "gpu-check"
    assert bench_main(["--gpu-check", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["header"]["device"].startswith("CPU") and results["header"]["commit"]
    tests = results["gpu_tests"]
    assert tests["skipped"] == len(tests["cases"]) >= 10 and tests["failed"] == tests["error"] == 0
    assert all("no CUDA GPU" in c["detail"] for c in tests["cases"])
    assert {r["decode"] for r in results["loader"]} == {"cpu"} and all(r["clips_per_s"] > 0 for r in results["loader"])
    assert results["end_to_end"]["steps"] == 4 and results["end_to_end"]["clips_per_s"] > 0
    side = {r["stage"].split(" (")[0]: r for r in results["loader_cpu_side"]}
    assert side["+ video decode"]["cpu_ms_per_clip"] > 0 and side["the hybrid loader"]["note"] == "needs a CUDA GPU"
    skipped = "\n".join(results["skipped"])
    for part in ("model: needs a CUDA GPU", "nvdec_smallest_frame", "loader mixed and hybrid", "targets"):
        assert part in skipped
    assert not any(isinstance(v, dict) and "traceback" in v for v in results.values())
    report = (out / "report.md").read_text()
    assert "## Skipped on this machine" in report and "## GPU tests" in report
    assert (out / "bench.png").stat().st_size > 10_000 and (out / "loader.csv").exists()

    # --parts: only the tests that did not pass run again, merged into the report; the other parts stay.
    first = results["gpu_tests"]["cases"][0]
    first.update(outcome="passed", detail="")
    (out / "results.json").write_text(json.dumps(results))
    assert bench_main(["--gpu-check", "--out", str(out), "--parts", "gpu_tests"]) == 0
    merged = json.loads((out / "results.json").read_text())
    cases = merged["gpu_tests"]["cases"]
    assert [c["nodeid"] for c in cases].count(first["nodeid"]) == 1 and len(cases) == len(tests["cases"])
    assert merged["gpu_tests"]["passed"] == 1 and merged["loader"] == results["loader"]
    assert merged["end_to_end"] == results["end_to_end"]
    with pytest.raises(SystemExit, match="unknown part"):
        bench_main(["--gpu-check", "--out", str(out), "--parts", "modle"])


def test_profile_mode_costs_each_stage_and_the_epoch_boundary(shards, tmp_path):
    out = tmp_path / "profile"
    assert bench_main(["--quick", "--modes", "profile", "--shards", str(shards), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["profile"]
    assert [r["stage"].split(" ")[0] for r in rows] == ["decode,", "+", "+", "+", "+", "+"]
    assert all(r["ms_min"] <= r["ms_per_clip"] <= r["ms_max"] for r in rows)
    assert sum(r["stage_ms"] for r in rows) == pytest.approx(rows[-1]["ms_per_clip"])
    assert rows[-1]["ms_per_clip"] > rows[0]["ms_per_clip"]  # a second view is never free
    b = results["epoch_boundary"]
    assert b["batches_per_epoch"] == 3 and b["steady_batch_s"] > 0 and b["boundary_s_max"] >= b["boundary_s"]
    assert "## Where a clip's time goes" in (out / "report.md").read_text()
    assert len(list(csv.DictReader(open(out / "profile.csv")))) == 6 and (out / "profile.png").stat().st_size > 5_000

    # The CPU side, part by part: each part costs something, the GPU rows say why they are empty here.
    side = {r["stage"].split(" (")[0]: r for r in results["cpu_side"]}
    assert all(r["content"] == "generated scenes" for r in results["cpu_side"])
    reads, reader = side["file reads alone"], side["reader"]
    decode, audio = side["+ video decode"], side["+ audio decode and window"]
    assert 0 < reads["cpu_ms_per_clip"] and 0 < reader["cpu_ms_per_clip"] < decode["cpu_ms_per_clip"]
    assert decode["stage_ms"] == pytest.approx(decode["cpu_ms_per_clip"] - reader["cpu_ms_per_clip"])
    assert audio["cpu_ms_per_clip"] > reader["cpu_ms_per_clip"]
    assert side["the CPU loader"]["cpu_ms_per_clip"] > decode["cpu_ms_per_clip"]  # two views are never free
    assert side["+ host-to-device copies"]["note"] == side["the hybrid loader"]["note"] == "needs a CUDA GPU"
    draw, demux = side["nvdec mode: draw pipeline and clip jobs"], side["+ demuxing each segment"]
    assert 0 < draw["cpu_ms_per_clip"] < demux["cpu_ms_per_clip"] and draw["stage_ms"] is None
    assert demux["stage_ms"] == pytest.approx(demux["cpu_ms_per_clip"] - draw["cpu_ms_per_clip"])
    assert side["the nvdec loader"]["note"] == "needs a CUDA GPU"
    assert "## CPU time per clip, part by part" in (out / "report.md").read_text()
    assert len(list(csv.DictReader(open(out / "cpu_side.csv")))) == len(results["cpu_side"]) == 11


def test_loader_summary_names_the_winner_per_core_of_each_content_set():
    from stica.tools.measure import loader_table, loader_winners

    def row(content, backend, parallel, rate):
        return {"content": content, "backend": backend, "decode": "cpu", "threads_or_workers": parallel,
                "prefetch": "-", "clips_per_s": rate, "clips_per_s_min": rate, "clips_per_s_max": rate,
                "clips_per_s_per_core": rate / parallel, "note": ""}

    rows = [row("generated scenes", "dali", 1, 30.0), row("generated scenes", "dali", 2, 40.0),
            row("generated scenes", "torchcodec", 2, 30.0), row("camera footage", "dali", 2, 20.0),
            row("camera footage", "torchcodec", 2, 25.0), row("camera footage", "reference", 2, 10.0)]
    generated, footage = loader_winners(rows, cores=2)
    assert "dali 20.0 (x2)" in generated and "**dali**" in generated and "DALI / torchcodec = 1.33x" in generated
    assert "**torchcodec**" in footage and "DALI / torchcodec = 0.80x" in footage
    assert loader_table(rows)[0].startswith("| content | backend |") and loader_table(rows)[2].startswith(
        "| generated scenes | dali | cpu | 1 |")


def test_model_ratios_survive_one_slow_repeat(monkeypatch, capsys):
    """A busy spell during one repeat of one row must not move that row's ratio to Default."""
    from stica.tools import bench_model
    from stica.tools.measure import summarize

    def fake(cfg, strategy, *args, **kwargs):
        times = [0.10, 0.10, 0.10] if strategy.name.startswith("Default") else [0.20, 0.20, 2.30]
        return {"step_s": summarize(times), "peak_mem_gib": None, "ops": {"forward": 1, "backward": 1, "update": 1},
                "gflops": 1.0}

    monkeypatch.setattr(bench_model, "measure_step", fake)
    rows = bench_model.run_model(dict(width=0.125, batch=2, frames=30, size=112, repeats=3, steps=1, warmup=0),
                                 torch.device("cpu"), None, 1000)
    assert all(r["relative_to_default"] == pytest.approx(2.0) for r in rows if not r["strategy"].startswith("Default"))
    assert "repeats span 11.5x" in capsys.readouterr().out


def test_loader_table_says_why_torchcodec_was_not_measured(monkeypatch):
    from stica.tools import bench_loader
    from stica.tools.measure import loader_table

    monkeypatch.setattr(bench_loader, "decoder_missing", lambda name: "RuntimeError: Could not load libtorchcodec")
    rows = bench_loader.run_loader("unused", {"parallel": [1, 2]}, ["torchcodec"])
    assert len(rows) == 1 and rows[0]["clips_per_s"] is None
    assert "| torchcodec | not measured: RuntimeError: Could not load libtorchcodec |" in loader_table(rows)[-1]


def test_gpu_check_budget_leaves_out_what_does_not_fit_and_writes_after_every_part(tmp_path):
    """A catalogue of stand-in parts: one measured, one that raises, one too long for what is
    left of the budget. Each part finds the one before it already in results.json and report.md;
    the left-out part is named with the --parts call that finishes it, and that call merges."""
    from stica.tools import gpu_check
    from stica.tools.bench import PRESETS
    from stica.tools.gpu_check import Part

    out = tmp_path / "check"
    seen = {}

    def first(c):
        return {"figure": 42}

    def broken(c):
        seen["on disk"] = json.loads((out / "results.json").read_text())["first"]
        seen["in report"] = "## Time by part" in (out / "report.md").read_text()
        raise RuntimeError("the device fell over")

    def last(c):
        return {"figure": 7}

    catalogue = (Part("first", first, 1), Part("broken", broken, 1), Part("long", last, 3600), Part("last", last, 1))
    assert gpu_check.main(out, PRESETS["quick"], ("first", "broken", "long", "last"), budget=60,
                          catalogue=catalogue) == 0
    results = json.loads((out / "results.json").read_text())
    assert seen == {"on disk": {"figure": 42}, "in report": True}
    assert results["first"] == {"figure": 42} and results["last"] == {"figure": 7}  # a smaller part still fits
    assert "RuntimeError: the device fell over" in results["broken"]["traceback"]
    assert results["left_out"] == [{"part": "long", "expected_s": 3600}] and "long" not in results
    assert results["finish_with"] == f"stica-bench --gpu-check --out {out} --parts long"
    assert set(results["timings"]) == {"first", "broken", "last"}
    report = (out / "report.md").read_text()
    assert "## Left out by the budget" in report and results["finish_with"] in report
    assert "## Parts that failed" in report and "the device fell over" in report

    # The finishing call: the long part runs, merged with what the first call measured.
    assert gpu_check.main(out, PRESETS["quick"], ("long",), catalogue=catalogue) == 0
    merged = json.loads((out / "results.json").read_text())
    assert merged["long"] == {"figure": 7} and merged["first"] == {"figure": 42} and merged["left_out"] == []
    # A part measured on this device plans with its measured time, not its estimate.
    merged["timings"]["long"] = 5
    (out / "results.json").write_text(json.dumps(merged))
    assert gpu_check.main(out, PRESETS["quick"], ("long",), budget=10, catalogue=catalogue) == 0
    assert json.loads((out / "results.json").read_text())["left_out"] == []


def test_gpu_check_part_one_runs_where_only_torch_is_installed(tmp_path):
    """As on a bare GPU machine: PyAV, DALI, spdl-io, torchcodec and webdataset do not import
    (a sitecustomize hides them from this process and the pytest it starts). The torch parts'
    runner loads, its gpu tests run (the modules that need PyAV report collection errors), and the
    parts on shards are skipped, naming what is missing."""
    import subprocess
    import sys

    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\nfor name in ('av', 'nvidia', 'nvidia.dali', 'spdl', 'spdl.io', 'torchcodec', 'webdataset', "
        "'wds2idx'):\n    sys.modules[name] = None\n")
    out = tmp_path / "check"
    env = {**__import__("os").environ, "PYTHONPATH": str(hide)}
    proc = subprocess.run([sys.executable, "-m", "stica.tools.bench", "--gpu-check", "--out", str(out),
                           "--parts", "gpu_tests,model,step_levers,loader"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    tests = results["gpu_tests"]
    assert tests["dali"] is False and tests["skipped"] >= 5 and tests["failed"] == 0
    assert not any(isinstance(v, dict) and "traceback" in v for v in results.values())
    skipped = "\n".join(results["skipped"])
    assert "shards: av, nvidia.dali not installed" in skipped and "loader: av, nvidia.dali not installed" in skipped
    assert "model: needs a CUDA GPU" in skipped
