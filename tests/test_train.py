"""The trainer end to end on generated shards: DDP on gloo, resume after SIGKILL and SIGTERM,
non-finite loss handling."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stica.config import load_config

from conftest import damage, kill_after_log_lines, pack_demo_corpus

TINY = ["model.width=0.125", "data.crop_size=32", "data.batch_size=4", "data.workers=0",
        "crops.space_medium=[1,2]", "crops.space_small=[2,1]", "crops.time_medium=[1,2]", "crops.time_small=[1,1]",
        "train.log_every=1", "optim.epochs=3", "optim.warmup_epochs=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return pack_demo_corpus(tmp_path_factory.mktemp("corpus"), train=16, val=4)


def train_cmd(shards, run_dir, *overrides, procs=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    return [sys.executable, *launcher, "-m", "stica.train", "--config", "configs/demo.yaml",
            f"data.shards={shards}", f"run.dir={run_dir}", *TINY, *overrides]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())}


def test_two_process_gloo_run(shards, tmp_path):
    run = tmp_path / "ddp"
    out = subprocess.run(train_cmd(shards, run, "train.max_steps=3", "train.keep_every_epochs=1", procs=2), env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es) on cpu, global batch 8, 2 steps/epoch" in out.stdout
    records = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(0 < r["loss"] < 10 and r["clips_per_s"] > 0 and 0 <= r["data_wait_pct"] <= 100 for r in records)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and state["loader"] == {"epoch": 1, "batch": 1} and len(state["rng"]) == 2
    assert state["config"]["data"]["batch_size"] == 4
    assert (run / "config.yaml").exists() and (run / "loss.png").exists() and (run / "epoch-001.pt").exists()


def test_killed_run_resumes_at_the_same_step_with_the_same_losses(shards, tmp_path):
    whole = tmp_path / "whole"
    subprocess.run(train_cmd(shards, whole, "train.max_steps=6"), env=ENV, check=True, capture_output=True)
    reference = losses(whole)

    killed = tmp_path / "killed"
    # train.deterministic (what a GPU needs for this, see test_gpu.py) runs here too and changes nothing on the CPU
    kill_after_log_lines(train_cmd(shards, killed, "train.max_steps=6", "train.ckpt_every=2",
                                   "train.deterministic=true"), killed, 3, env=ENV)
    saved = torch.load(killed / "checkpoint.pt", weights_only=False)["step"]
    assert 2 <= saved < 6
    out = subprocess.run(train_cmd(shards, killed, "train.max_steps=6"), env=ENV, capture_output=True, text=True,
                         check=True)
    assert f"resumed from {killed / 'checkpoint.pt'} at step {saved}" in out.stdout
    resumed = losses(killed)  # later lines (the resumed run's) win
    for step in range(saved + 1, 7):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_sigterm_saves_then_the_rerun_continues(shards, tmp_path):
    run = tmp_path / "term"
    proc = subprocess.Popen(train_cmd(shards, run, "train.max_steps=50"), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if "step 2/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait() == 0
    assert "SIGTERM: saved step" in rest
    saved = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    out = subprocess.run(train_cmd(shards, run, "train.max_steps=" + str(saved + 1)), env=ENV, capture_output=True,
                         text=True, check=True)
    assert f"at step {saved}" in out.stdout and f"step {saved + 1}/" in out.stdout


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    run = tmp_path / "nan"
    out = subprocess.run(train_cmd(shards, run, "optim.base_lr=1e12", "optim.warmup_epochs=0", "train.ckpt_every=1",
                                   "train.max_steps=20"), env=ENV, capture_output=True, text=True)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "non-finite loss at step" in out.stdout
    bad_step = int(out.stdout.split("non-finite loss at step ")[1].split()[0])
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == bad_step - 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_at_another_world_size_continues_at_the_epoch_boundary_and_refuses_mid_epoch(shards, tmp_path):
    run = tmp_path / "rescale"
    # 16 videos, batch 4: 2 steps per epoch on 2 processes, 4 on one.
    out = subprocess.run(train_cmd(shards, run, "train.max_steps=2", procs=2), env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert (state["step"], state["world"], state["samples_seen"], state["loader"]) == (2, 2, 16, {"epoch": 1, "batch": 0})
    out = subprocess.run(train_cmd(shards, run, "train.max_steps=6"), env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "at step 4 (epoch 1, batch 0, 2 -> 1 process(es))" in out.stdout  # one epoch = 4 steps of 4 clips now
    assert [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())][-2:] == [5, 6]

    mid = tmp_path / "mid"
    out = subprocess.run(train_cmd(shards, mid, "train.max_steps=3", procs=2), env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run(train_cmd(shards, mid, "train.max_steps=6"), env=ENV, capture_output=True, text=True)
    assert out.returncode != 0
    assert "written by 2 processes in the middle of epoch 1 (batch 1)" in out.stderr
    assert torch.load(mid / "checkpoint.pt", weights_only=False)["step"] == 3  # nothing overwritten


@pytest.mark.parametrize("config", sorted(str(p) for p in Path("configs").glob("*.yaml")))
def test_a_misspelt_key_is_an_error_naming_the_closest_keys(config, tmp_path):
    cfg = load_config(config, ["data.batch_size=3"])
    assert cfg.data.batch_size == 3
    for bad, key, hint in (("data.batchsize=4", "data.batchsize", "data.batch_size"),
                           ("trian.amp=none", "trian", "train"),
                           ("model.transformer.layer=1", "model.transformer.layer", "model.transformer.layers")):
        with pytest.raises(ValueError, match=rf"unknown config key '{key}'; did you mean {hint}"):
            load_config(config, [bad])
    # ...in a config file over its defaults too, and writes after loading are held to the keys.
    child = tmp_path / "child.yaml"
    child.write_text(f"defaults: {Path(config).resolve()}\ndata:\n  batch_size: 2\n  crop_sise: 96\n")
    with pytest.raises(ValueError, match=r"unknown config key 'data.crop_sise'.*data.crop_size"):
        load_config(child)
    with pytest.raises(Exception):
        cfg.data.batchsize = 4


def test_a_damaged_sample_is_named_replaced_and_known_after_resume(tmp_path):
    """A sample DALI cannot decode, on 2 processes: the run goes on (ranks in step), the sample is
    named with its shard and DALI's reason in bad_samples.jsonl and counted in log.jsonl; the
    resumed run knows it and does not trip on it again."""
    shards = pack_demo_corpus(tmp_path / "corpus", train=16, val=4)
    key = damage(shards, 5)
    run = tmp_path / "run"
    out = subprocess.run(train_cmd(shards, run, "train.max_steps=3", procs=2), env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = [json.loads(l) for l in (run / "bad_samples.jsonl").read_text().splitlines()]
    assert record["key"] == key and record["shard"] == "train-000000.tar" and record["epoch"] == 0
    assert "Failed to create video decoder" in record["reason"] and record["reason"].startswith("segment 0 of")
    assert f"1 damaged sample(s) replaced: {key}" in out.stdout
    records = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["bad_samples"] == 1
    assert torch.load(run / "checkpoint.pt", weights_only=False)["bad_samples"] == [record]

    out = subprocess.run(train_cmd(shards, run, "train.max_steps=6", procs=2), env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "at step 3" in out.stdout and "cannot be decoded" not in out.stdout + out.stderr
    assert len((run / "bad_samples.jsonl").read_text().splitlines()) == 1
    assert [json.loads(l)["step"] for l in (run / "log.jsonl").read_text().splitlines()][-3:] == [4, 5, 6]
