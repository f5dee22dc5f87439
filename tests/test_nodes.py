"""A job that never waits forever, and many nodes on one machine: a SIGSTOPped rank ends the job
within comm.train_timeout_s and the restarted group finishes; two torchrun agents (two "nodes",
c10d rendezvous on 127.0.0.1) train with node-wide BN statistics, and a lost node's job resumes with
the uninterrupted run's losses; the SLURM recipe's torchrun arguments rendezvous for real."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stica.heartbeat import verdicts

from conftest import pack_demo_corpus
from test_step import free_port
from test_train import ENV, TINY, losses

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return pack_demo_corpus(tmp_path_factory.mktemp("corpus"), train=16, val=4)


def agent(script, *args, nnodes=1, nproc=2, port, restarts=0, rdzv_id="stica-test"):
    """One torchrun agent: a node. Every agent of a job runs the same command."""
    rdzv = ["--standalone"] if nnodes == 1 else ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                                                 f"--rdzv_id={rdzv_id}"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
            f"--max-restarts={restarts}", *rdzv, *script, *args]


def train_args(shards, run_dir, *overrides):
    return ["-m", "stica.train", "--config", "configs/demo.yaml", f"data.shards={shards}", f"run.dir={run_dir}",
            *TINY, "comm.heartbeat_s=1", *overrides]


def start(cmd, log: Path, env=ENV):
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def kill_node(proc: subprocess.Popen):
    """SIGKILL an agent and every process under it, as a lost node: torchrun starts its workers in
    sessions of their own, so killing the agent's process group leaves them running."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after the command's name
            children.setdefault(ppid, []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    tree, todo = [], [proc.pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return time.time()
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def logged_steps(run_dir: Path) -> int:
    log = run_dir / "log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_a_stopped_rank_ends_the_job_within_the_timeout_and_the_restart_finishes(shards, tmp_path):
    """Rank 1 SIGSTOPped after step 4, as on a stuck file system or a swapping node: rank 0's next
    collective times out after comm.train_timeout_s, its last line names rank 1 as silent from the
    heartbeats, torchrun restarts the group and the run resumes from its last checkpoint."""
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    timeout = 10
    job = start(agent(train_args(shards, run, "train.max_steps=8", "train.ckpt_every=2",
                                 f"comm.train_timeout_s={timeout}", "optim.epochs=4"),
                      port=None, restarts=1), log)
    try:
        wait_for(lambda: logged_steps(run) >= 4, 300, "step 4")
        pid = json.loads((run / "heartbeat" / "rank-00001.json").read_text())["pid"]
        os.kill(pid, signal.SIGSTOP)
        stopped = time.time()
        failed = wait_for(lambda: "rank 0 failed at step" in log.read_text(), timeout + 60, "rank 0 to fail")
        assert failed - stopped < timeout + 60
        assert job.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            kill_node(job)
    text = log.read_text()
    failure = text.split("rank 0 failed at step")[1].split("[stica.train] resumed")[0]
    assert "Timed out" in failure  # gloo's own text: it names no peer...
    assert "rank 1 (" in failure and "silent  <- no heartbeat" in failure  # ...the heartbeats do
    assert "rank 0 (" in failure and "step 4, " in failure and ", failed" in failure
    # Its last checkpoint: step 4's, or step 2's where rank 1 stopped before step 4's save (which
    # waits on a health check every rank takes).
    saved = int(text.split("resumed from")[1].split("at step ")[1].split()[0])
    assert saved in (2, 4) and [json.loads(l)["step"] for l in (run / "log.jsonl").read_text().splitlines()][-1] == 8
    final = verdicts(run)
    assert [v for _, v in final.values()] == ["done", "done"] and {b["restart"] for b, _ in final.values()} == {1}


def test_heartbeat_verdicts_tell_a_stopped_rank_from_a_stuck_one(tmp_path):
    """Files as four ranks leave them at t=100 with 5 s beats: one beating and current, one whose
    beats stopped 20 s ago (SIGSTOP, a lost host), one beating but stuck 30 s behind the front (a
    deadlock inside the process), one that never wrote; and a finished run's ranks."""
    beat_dir = tmp_path / "heartbeat"
    beat_dir.mkdir()
    def beat(rank, step, step_time, time, state="running"):
        (beat_dir / f"rank-{rank:05d}.json").write_text(json.dumps(
            {"rank": rank, "host": "n", "pid": 1, "restart": 0, "step": step, "step_time": step_time,
             "time": time, "every": 5, "state": state}))
    beat(0, 40, 99, 99)
    beat(1, 38, 80, 80)
    beat(2, 30, 70, 99)
    got = {rank: v for rank, (_, v) in verdicts(tmp_path, world=4, now=100).items()}
    assert got == {0: "ok", 1: "silent", 2: "stalled", 3: "missing"}
    beat(0, 40, 99, 99, "done")
    beat(1, 40, 99, 99, "failed")
    beat(2, 40, 10, 99)  # at the front: slow steps, not stuck
    assert [v for _, v in verdicts(tmp_path, world=3, now=100).values()] == ["done", "failed", "ok"]


def test_node_bn_groups_hold_each_nodes_statistics(tmp_path):
    """4 ranks on two agents with sync_group('node'): each node's two ranks normalise together, exactly
    as one process holding that node's 4 clips; the other node's clips do not enter."""
    port = free_port()
    worker = [str(ROOT / "tests" / "node_bn_worker.py"), str(tmp_path)]
    jobs = [start(agent(worker, nnodes=2, port=port), tmp_path / f"agent{n}.log") for n in range(2)]
    for n, job in enumerate(jobs):
        assert job.wait(timeout=300) == 0, (tmp_path / f"agent{n}.log").read_text()[-3000:]
    x = torch.load(tmp_path / "input.pt")
    for rank in range(4):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        node = rank // 2
        assert got["node"] == node and got["group"] == [2 * node, 2 * node + 1]
        bn = torch.nn.BatchNorm3d(x.shape[1]).train()
        y = bn(x[4 * node:4 * node + 4])
        torch.testing.assert_close(got["y"], y[2 * (rank % 2):2 * (rank % 2) + 2].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["running_mean"], bn.running_mean)
        torch.testing.assert_close(got["running_var"], bn.running_var)
    assert not torch.allclose(torch.load(tmp_path / "rank0.pt")["running_mean"],
                              torch.load(tmp_path / "rank2.pt")["running_mean"])


def two_node_run(shards, run_dir, logs: Path, port, *overrides, kill_after=None):
    """A 2-node x 2-process job; with kill_after=N, node 1 (its agent and workers) is SIGKILLed once
    the log holds N steps, then started again, as a requeued or replaced node would be."""
    args = train_args(shards, run_dir, "train.max_steps=6", "train.ckpt_every=2", "train.sync_bn=all",
                      "train.sync_bn_group=node", "data.batch_size=2", *overrides)
    cmd = agent(args, nnodes=2, port=port, restarts=1, rdzv_id=run_dir.name)
    env = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # as docs/training.md says for a job whose nodes can be replaced
    nodes = [start(cmd, logs / f"{run_dir.name}-node0.log", env)]
    time.sleep(1)  # node 0 hosts the rendezvous store, as the rdzv_endpoint's host does
    nodes.append(start(cmd, logs / f"{run_dir.name}-node1.log", env))
    try:
        if kill_after:
            wait_for(lambda: logged_steps(run_dir) >= kill_after, 300, f"step {kill_after}")
            kill_node(nodes[1])
            nodes[1] = start(cmd, logs / f"{run_dir.name}-node1-again.log", env)
        for n, node in enumerate(nodes):
            assert node.wait(timeout=400) == 0, (logs / f"{run_dir.name}-node{n}.log").read_text()[-3000:]
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_node(node)
    return "".join(p.read_text() for p in sorted(logs.glob(f"{run_dir.name}-node*.log")))


def test_two_nodes_train_and_a_lost_node_resumes_with_the_uninterrupted_losses(shards, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    out = two_node_run(shards, whole, tmp_path, free_port())
    assert "4 process(es) on cpu, global batch 8, 2 steps/epoch" in out
    state = torch.load(whole / "checkpoint.pt", weights_only=False)
    assert state["world"] == 4 and state["step"] == 6 and len(state["rng"]) == 4

    out = two_node_run(shards, cut, tmp_path, free_port(), kill_after=3)
    saved = int(out.split("resumed from")[1].split("at step ")[1].split()[0])
    assert 2 <= saved < 6
    reference, resumed = losses(whole), losses(cut)
    assert sorted(resumed) == list(range(1, 7))
    # The first resumed step repeats the uninterrupted run's loss bit for bit: weights, optimiser,
    # data order and augmentation draws restored. Later steps are not asserted: at 4 processes (one
    # node or two, killed or cleanly stopped) a resumed run drifts from the uninterrupted one
    # (measured 2026-12-07: 1e-6 at the second resumed step at this learning rate, 1.2% at the
    # first step of the next epoch at a twentieth of it); 2 processes stay exact
    # (tests/test_train.py). An open defect, named in docs/nodes.md.
    assert resumed[saved + 1] == reference[saved + 1]
    assert all(math.isfinite(resumed[step]) for step in range(saved + 2, 7))


def test_the_slurm_recipe_rendezvous_two_nodes(shards, tmp_path):
    """tools/slurm_pretrain.sh under a simulated SLURM allocation of 2 nodes: `scontrol` names the
    hosts (127.0.0.1 here), `srun` starts the script's command once per node as SLURM would, and
    the real torchrun agents rendezvous and train with the recipe's arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "127.0.0.1\\nnode2\\n"\n')
    (bin_dir / "srun").write_text(
        '#!/bin/bash\necho "$@" > "$STUB_LOG"\nwhile [[ "$1" == --* ]]; do shift; done\n'
        'for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n SLURM_PROCID=$n "$@" & done\nwait\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    run = tmp_path / "run"
    env = {**ENV, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{ENV['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "127.0.0.1,node2", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1",
           "STICA_RDZV_PORT": str(free_port()), "STICA_CONFIG": "configs/demo.yaml",
           "STUB_LOG": str(tmp_path / "srun.txt")}
    out = subprocess.run(["bash", "tools/slurm_pretrain.sh", *train_args(shards, run, "train.max_steps=2")[4:]],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    srun = (tmp_path / "srun.txt").read_text()
    assert srun.startswith("--kill-on-bad-exit=1 ") and "--nnodes=2 --nproc_per_node=1" in srun
    assert "--rdzv_endpoint=127.0.0.1:" in srun and "--rdzv_id=4242" in srun
    assert "2 process(es) on cpu" in out.stdout
    assert torch.load(run / "checkpoint.pt", weights_only=False)["world"] == 2
