"""What a training step costs beyond its arithmetic, counted rather than timed: host syncs
(data-dependent ops), collectives per train.sync_bn setting at world size 2, and the ops a step
dispatches. Also the synchronised BN's values against one process holding the whole batch."""
import json
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from stica.config import load_config

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "reduce_scatter_single",
               "broadcast", "_broadcast_coalesced", "all_gather_object", "broadcast_object_list", "barrier",
               "all_to_all_single", "reduce", "gather", "scatter")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_bn_worker(rank, world, port, x, heads, grad, params, out_dir):
    import torch.distributed as dist

    from stica.batchnorm import SyncBatchNorm, grouped_batch_norm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    n, m = x.shape[0] // world, heads.shape[1] // world
    # The trunk: this rank's clips of x. The head: this rank's rows of each of the runs in `heads`.
    for name, mine, groups in (("trunk", x[rank * n:(rank + 1) * n], 1),
                               ("head", torch.cat(list(heads[:, rank * m:(rank + 1) * m])), heads.shape[0])):
        bn = SyncBatchNorm(mine.shape[1]).train()
        bn.weight.data.copy_(params[name][0])
        bn.bias.data.copy_(params[name][1])
        mine = mine.clone().requires_grad_()
        y = grouped_batch_norm(bn, mine, groups)
        (y * grad[: y.numel()].view_as(y)).sum().backward()
        results[name] = {"y": y.detach(), "grad_x": mine.grad, "grad_w": bn.weight.grad, "grad_b": bn.bias.grad,
                         "running_mean": bn.running_mean, "running_var": bn.running_var}
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_synced_batchnorm_equals_one_process_holding_the_global_batch(tmp_path):
    """2 ranks x 3 clips against one process with all 6: outputs, input gradients, the summed affine
    gradients and the running statistics; and a grouped (ghost) head BN of 3 runs, each normalised
    over its rows on both ranks."""
    torch.manual_seed(1)
    x = torch.randn(6, 4, 3, 5, 5) * 3 + 1
    heads = torch.randn(3, 4, 6) * torch.tensor([1.0, 2.0, 5.0]).view(3, 1, 1)  # run, row, channel
    grad = torch.randn(x.numel() // 2)
    params = {"trunk": (torch.randn(4), torch.randn(4)), "head": (torch.randn(6), torch.randn(6))}
    mp.spawn(_sync_bn_worker, args=(2, free_port(), x, heads, grad, params, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    bn = torch.nn.BatchNorm3d(4).train()
    bn.weight.data.copy_(params["trunk"][0])
    bn.bias.data.copy_(params["trunk"][1])
    full = x.clone().requires_grad_()
    y = bn(full)
    (y * torch.cat([grad.view(3, 4, 3, 5, 5)] * 2)).sum().backward()
    got = [r["trunk"] for r in ranks]
    torch.testing.assert_close(torch.cat([got[0]["y"], got[1]["y"]]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([got[0]["grad_x"], got[1]["grad_x"]]), full.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0]["grad_w"] + got[1]["grad_w"], bn.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0]["grad_b"] + got[1]["grad_b"], bn.bias.grad, rtol=1e-4, atol=1e-4)
    for r in got:  # every rank keeps the same running statistics: those of the whole batch
        torch.testing.assert_close(r["running_mean"], bn.running_mean)
        torch.testing.assert_close(r["running_var"], bn.running_var)

    w, b = params["head"]
    for r, rank in enumerate(ranks):
        y = rank["head"]["y"].view(3, 2, 6)
        for g in range(3):
            torch.testing.assert_close(y[g], F.batch_norm(heads[g], None, None, w, b, True)[2 * r:2 * r + 2],
                                       rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank["head"]["running_mean"], 0.1 * heads.mean(1).mean(0))
        torch.testing.assert_close(rank["head"]["running_var"], 0.9 + 0.1 * heads.var(1).mean(0))


def _step_worker(rank, world, port, sync_bn, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from stica import distributed
    from stica.crops import crop_layout
    from stica.losses import stica_terms
    from stica.model import Stica, feature_grid
    from stica.tools.measure import OpCounter
    from stica.train import Meter, sync_batchnorm, train_step

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = load_config("configs/demo.yaml", ["model.transformer.heads=2", f"train.sync_bn={sync_bn}"])
    model = Stica(cfg.model)
    sync_batchnorm(model, cfg.train, distributed.Dist(rank, world, rank, world, torch.device("cpu")))
    synced = sum(type(m).__name__ == "SyncBatchNorm" for m in model.modules())
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=True, **distributed.NO_BUFFER_SYNC)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    terms = stica_terms(cfg.loss, 2, crop_layout(cfg.crops, feature_grid(16, 64, 64)), "cpu")
    batch = {"video": [torch.randn(4, 3, 16, 64, 64) for _ in range(2)], "audio": torch.randn(4, 1, 64, 49),
             "has_audio": torch.tensor([True, True, False, True])}
    meter = Meter(torch.device("cpu"))
    calls = []
    for name in COLLECTIVES:  # every Python-level collective; DDP's gradient buckets run in C++
        real = getattr(dist, name)
        setattr(dist, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    steps = []
    for step in range(1, 4):
        calls.clear()
        with OpCounter() as counter:
            loss, losses = train_step(ddp, batch, cfg, terms, np.random.default_rng(step), torch.device("cpu"), False,
                                      None, optimizer, scaler)
            meter.add(step, 0.0, 0.0, loss, losses)
        distributed.any_rank(meter.first_bad, False, torch.device("cpu"))  # the trainer's health check
        steps.append({"collectives": list(calls), "data_dependent": counter.data_dependent})
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"synced_bn": synced, "steps": steps}))
    dist.destroy_process_group()


def run_steps(tmp_path, sync_bn):
    out = tmp_path / sync_bn
    out.mkdir()
    mp.spawn(_step_worker, args=(2, free_port(), sync_bn, out), nprocs=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("sync_bn, synced_bn", [("none", 0), ("heads", 2), ("all", 37 + 12 + 2)])
def test_a_step_makes_no_host_sync_and_a_known_number_of_collectives_at_world_size_2(tmp_path, sync_bn, synced_bn):
    """2 processes on gloo, the paper's crop recipe scaled to the demo's map (2x3^2 + 2x2^2, 1x2 +
    1x1: 56 within-modal and 4 cross-modal NCE terms). Inside the step, no op whose result the
    host must wait for (nonzero, boolean indexing, .item(), ...). Outside DDP's buckets: one
    all_gather of all the step's embeddings, its reduce-scatter in backward, the health check,
    and per synchronised BN call one all_reduce forward and one backward (the video trunk's 37 run
    once per view)."""
    for rank in run_steps(tmp_path, sync_bn):
        assert rank["synced_bn"] == synced_bn
        bn_calls = {"none": 0, "heads": 2, "all": 37 * 2 + 12 + 2}[sync_bn]
        for step in rank["steps"]:
            assert step["data_dependent"] == [], step["data_dependent"][:5]
            calls = step["collectives"]
            assert len(calls) == 3 + 2 * bn_calls, calls
            assert calls.count("all_reduce") == 1 + 2 * bn_calls
            assert sum(c.startswith("all_gather") for c in calls) == 1
            assert sum(c.startswith("reduce_scatter") for c in calls) == 1


def test_the_host_sync_counter_sees_every_kind_of_data_dependent_op():
    """The control: what torch.nn.SyncBatchNorm does on every call (`count_all[mask]`, boolean
    indexing), and the other ways a step makes the host wait for a value, are each counted; their
    shape-static twins are not. (A copy to the host, `.tolist()` of a GPU tensor, is counted too;
    on the CPU it reads memory and dispatches nothing.)"""
    from stica.tools.measure import OpCounter

    x, mask = torch.randn(4, 3), torch.tensor([True, False, True, True])
    waits = {"boolean indexing": lambda: x[mask], "item": lambda: x.sum().item(),
             "bool": lambda: bool(x[0, 0] > 0), "nonzero": lambda: mask.nonzero(),
             "masked_select": lambda: x.masked_select(mask[:, None]), "boolean assignment": lambda: x.clone().__setitem__(mask, 0.0),
             "unique": lambda: mask.unique()}
    for name, op in waits.items():
        with OpCounter() as counter:
            op()
        assert counter.data_dependent, name
    with OpCounter() as counter:
        x.masked_fill(~mask[:, None], 0.0), torch.where(mask[:, None], x, 0.0), x.index_select(0, torch.tensor([0, 2]))
    assert counter.data_dependent == [] and counter.total >= 3


@pytest.mark.parametrize("layers", [0, 2])
def test_the_feature_crop_step_dispatches_at_most_1_15x_the_ops_of_two_rgb_crops(layers):
    """The paper's feature crops (2x6^2 + 4x4^2, 2x3 + 1x2: 18 crops, 116 NCE terms) against two RGB
    crops (Table 1f), forward + backward + SGD, width 1/16: the crops are batched, not looped."""
    from stica.tools.bench_model import measure_step, table_1f

    cfg = load_config("configs/pretrain_kinetics.yaml", ["model.width=0.0625", f"model.transformer.layers={layers}"])
    strategies = {s.name: s for s in table_1f()}
    ops = {name: sum(measure_step(cfg, strategies[name], 2, 30, 112, torch.device("cpu"), None, repeats=1, steps=1,
                                  warmup=1)["ops"].values())
           for name in ("Two RGB crops (2x112^2)", "Feature crops (2x6^2 + 4x4^2, 2x3 + 1x2)", "Default (1x112^2)")}
    assert ops["Feature crops (2x6^2 + 4x4^2, 2x3 + 1x2)"] <= 1.15 * ops["Two RGB crops (2x112^2)"], ops
    assert ops["Two RGB crops (2x112^2)"] > ops["Default (1x112^2)"]  # a second view is never free


def test_the_compiled_post_trunk_region_gives_the_eager_losses():
    """train.compile=heads (crop windows, pooling, heads and the NCE terms under torch.compile, on
    the CPU here): three steps with new crop positions each, one compiled graph, the eager losses."""
    from stica.crops import crop_layout
    from stica.losses import stica_terms
    from stica.model import Stica, feature_grid
    from stica.train import compile_regions, train_step

    cfg = load_config("configs/demo.yaml", ["model.transformer.heads=2"])
    g = torch.Generator().manual_seed(0)
    batch = {"video": [torch.randn(4, 3, 16, 64, 64, generator=g) for _ in range(2)],
             "audio": torch.randn(4, 1, 64, 49, generator=g), "has_audio": torch.tensor([True, True, False, True])}
    losses = {}
    for regions in ("none", "heads"):
        torch.manual_seed(0)
        model = Stica(cfg.model)
        terms = stica_terms(cfg.loss, 2, crop_layout(cfg.crops, feature_grid(16, 64, 64)), "cpu")
        compile_regions(model, terms, regions, "default")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        losses[regions] = [train_step(model, batch, cfg, terms, np.random.default_rng(step), torch.device("cpu"), False,
                                      None, optimizer, torch.amp.GradScaler("cuda", enabled=False))[0].item()
                           for step in range(3)]
    assert losses["heads"] == pytest.approx(losses["none"], rel=1e-5)
    assert len(set(losses["none"])) == 3  # the steps differ: new crops, updated weights
    with pytest.raises(ValueError, match="train.compile='trunk'"):
        compile_regions(model, terms, "trunk", "default")
