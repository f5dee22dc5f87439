"""Model sizes, feature crops and losses against direct computations: the batched step (every
crop in one call, every NCE term in one bmm) against the per-crop, per-term loop it replaces."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from stica.config import load_config
from stica.crops import crop_layout, sample_crops, windows
from stica.losses import Keys, Terms, nce, stica_terms, within_modal_pairs
from stica.model import Stica, feature_grid, time_steps

CONFIG = "configs/pretrain_kinetics.yaml"


@pytest.mark.parametrize("layers, paper_millions", [(0, 37.2), (2, 42.4), (4, 47.7)])
def test_parameter_counts_match_table_1d(layers, paper_millions):
    cfg = load_config(CONFIG, [f"model.transformer.layers={layers}"])
    params = sum(p.numel() for p in Stica(cfg.model).parameters()) / 1e6
    assert abs(params - paper_millions) / paper_millions < 0.02, params


def test_trunk_output_map_and_grid():
    cfg = load_config(CONFIG, ["model.width=0.125"])
    model = Stica(cfg.model).eval()
    with torch.no_grad():
        fmap = model.video(torch.randn(1, 3, 30, 112, 112))
        spec = model.audio(torch.randn(2, 1, 257, 99))
    assert tuple(fmap.shape[2:]) == feature_grid(30, 112, 112) == (4, 7, 7)
    assert feature_grid(60, 112, 112) == (8, 7, 7)
    assert tuple(spec.shape) == (2, model.audio.out_dim)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_the_2d_convolutions_are_the_3d_ones_with_the_same_weights(memory_format):
    """model.conv=conv2d runs the (1,k,k) and (k,1,1) factors as 2-D convolutions (over frames, over
    the T x H*W plane): the state_dict keys and shapes are conv3d's (so export is unchanged) and
    the trunk's outputs and weight gradients equal conv3d's, strides included."""
    from stica.model import FrameConv, R2Plus1D18, TimeConv

    torch.manual_seed(0)
    # float64: the two orders of summation then agree to ~1e-12 (fp32 leaves ~1e-5 of the largest gradient)
    three = R2Plus1D18(0.125, conv="conv3d").double().to(memory_format=memory_format)
    two = R2Plus1D18(0.125, conv="conv2d").double().to(memory_format=memory_format)
    assert {k: v.shape for k, v in two.state_dict().items()} == {k: v.shape for k, v in three.state_dict().items()}
    two.load_state_dict(three.state_dict())
    x = torch.randn(2, 3, 16, 48, 40, dtype=torch.float64).contiguous(memory_format=memory_format)
    outputs = [m(x) for m in (three, two)]
    assert outputs[0].shape == (2, 64, 2, 3, 3)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-9, atol=1e-9)
    for m, y in zip((three, two), outputs):
        y.square().sum().backward()
    for (name, p3), p2 in zip(three.named_parameters(), two.parameters()):
        torch.testing.assert_close(p2.grad, p3.grad, rtol=1e-9, atol=1e-8, msg=lambda m: f"{name}: {m}")
    for name, m in two.named_modules():  # DDP's bucket views expect a gradient in its parameter's layout
        if isinstance(m, (FrameConv, TimeConv)):
            assert m.weight.grad.stride() == m.weight.stride(), name
    with pytest.raises(ValueError, match="model.conv='conv1d'"):
        R2Plus1D18(0.125, conv="conv1d")


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_residual_starts_each_block_as_its_skip(zero_init):
    """With model.zero_init_residual, a block whose skip is the identity hands a (post-ReLU)
    input through unchanged at initialisation; with the released init it does not."""
    cfg = load_config(CONFIG, ["model.width=0.125", f"model.zero_init_residual={zero_init}"])
    model = Stica(cfg.model).train()  # batch statistics: the BN's running stats play no part
    x = torch.randn(2, model.video.stages[0][1].conv1[0][0].in_channels, 4, 8, 8).relu()
    s = torch.randn(2, model.audio.blocks[0].conv1.in_channels, 16, 16).relu()
    with torch.no_grad():
        for block, inp in ((model.video.stages[0][1], x), (model.audio.blocks[0], s)):
            assert block.downsample is None
            assert torch.allclose(block(inp), inp) == zero_init



PAPER_CROPS = OmegaConf.create({"space_medium": [2, 6], "space_small": [4, 4], "time_medium": [2, 3],
                                "time_small": [1, 2]})


def crop_of(fmap, crop):
    """The reference: a crop as a slice of the map B,D,T,H,W, as the released code takes it."""
    if crop.axis == "space":
        (y, x), n = crop.start, crop.size
        return fmap[:, :, :, y:y + n, x:x + n]
    return fmap[:, :, crop.start[0]:crop.start[0] + crop.size]


def test_crop_sampler_covers_every_valid_position_and_nothing_outside():
    rng = np.random.default_rng(0)
    seen = {("space", 6): set(), ("space", 4): set(), ("time", 3): set(), ("time", 2): set()}
    for _ in range(300):
        crops = sample_crops(PAPER_CROPS, (4, 7, 7), rng)
        assert [(c.axis, c.size, c.small) for c in crops] == \
            [("space", 6, False)] * 2 + [("space", 4, True)] * 4 + [("time", 3, False)] * 2 + [("time", 2, True)]
        assert [(c.axis, c.size, c.small) for c in crops] == [(c.axis, c.size, c.small)
                                                             for c in crop_layout(PAPER_CROPS, (4, 7, 7))]
        for c in crops:
            seen[(c.axis, c.size)].add(c.start)
    assert seen[("space", 6)] == {(y, x) for y in range(2) for x in range(2)}  # not only the top-left one
    assert seen[("space", 4)] == {(y, x) for y in range(4) for x in range(4)}
    assert seen[("time", 3)] == {(0,), (1,)}
    assert seen[("time", 2)] == {(0,), (1,), (2,)}
    with pytest.raises(ValueError, match="does not fit"):
        sample_crops(OmegaConf.create({"space_medium": [1, 8], "space_small": [0, 4], "time_medium": [0, 3],
                                       "time_small": [0, 2]}), (4, 7, 7), rng)


def test_window_weights_average_exactly_the_cropped_positions():
    """Each window's rows are the spatial means of its time steps, nothing else; padding rows are zero."""
    rng = np.random.default_rng(1)
    fmap = torch.randn(3, 5, 4, 7, 7, dtype=torch.float64)
    crops = [sample_crops(PAPER_CROPS, (4, 7, 7), rng) for _ in range(2)]
    weights, valid = windows(crops, (4, 7, 7))
    assert weights.shape == (2, 10, 4, 4 * 49) and valid.shape == (10, 4)
    assert valid.sum(1).tolist() == [4] * 7 + [3, 3, 2]
    for v, cs in enumerate(crops):
        for s, m in enumerate([fmap] + [crop_of(fmap, c) for c in cs]):
            rows = weights[v, s].double() @ fmap.flatten(2).transpose(1, 2)  # B,T,D
            n = int(valid[s].sum())
            torch.testing.assert_close(rows[:, :n], time_steps(m), rtol=1e-6, atol=1e-7)
            assert not rows[:, n:].any()


def loop_embeddings(model, fmaps, crops):
    """The reference: one pooling + head call per view and per crop (BN statistics per call), as
    the released code's feat2nce runs them."""
    return [[F.normalize(model.video_head(model.pool(time_steps(m))), dim=1) for m in [f] + [crop_of(f, c) for c in cs]]
            for f, cs in zip(fmaps, crops)]


def loop_loss(loss_cfg, video, audio, has_audio, crops):
    """The reference loss: one nce() call per term, eq. (7) with the means of eq. (1) and (6)."""
    va = [nce(v[0], audio, loss_cfg.temp_va, 0, has_audio, has_audio) for v in video] + \
         [nce(audio, v[0], loss_cfg.temp_va, 0, has_audio, has_audio) for v in video]
    vv = [nce(video[0][1 + i], video[1][1 + j], loss_cfg.temp_vv) if d == 0 else
          nce(video[1][1 + j], video[0][1 + i], loss_cfg.temp_vv)
          for d, i, j in within_modal_pairs(crops[0], crops[1], loss_cfg.vv_pairs)]
    l_va, l_vv = torch.stack(va).mean(), torch.stack(vv).mean()
    return loss_cfg.weight_va * l_va + loss_cfg.weight_vv * l_vv, l_va, l_vv


@pytest.mark.parametrize("pooling", ["average", "transformer", "transformer, cls + positions"])
def test_batched_crops_and_terms_give_the_losses_and_gradients_of_the_per_crop_loop(pooling):
    """The paper's crops on a 4x7x7 map: 2 views x (whole + 9 crops) in one pooling and head call
    and 116 NCE terms in one bmm give the loss, its terms and every gradient (maps and parameters)
    of the loop, to fp32 precision; some clips are silent."""
    overrides = ["model.width=0.0625", "model.head_dropout=0.0",
                 f"model.transformer.layers={0 if pooling == 'average' else 2}"]
    if "cls" in pooling:
        overrides += ["model.transformer.token=cls", "model.transformer.positional=true"]
    cfg = load_config(CONFIG, overrides)
    torch.manual_seed(0)
    model = Stica(cfg.model).train()
    if model.pool.pos is not None:
        torch.nn.init.normal_(model.pool.pos.weight)
    B, D = 6, model.video.out_dim
    fmaps = [torch.randn(B, D, 4, 7, 7, requires_grad=True) for _ in range(2)]
    audio = F.normalize(torch.randn(B, cfg.model.embed_dim), dim=1).requires_grad_()
    has_audio = torch.tensor([True, True, False, True, True, False])
    crops = [sample_crops(cfg.crops, (4, 7, 7), np.random.default_rng(3 + v)) for v in range(2)]

    def grads(loss):
        params = [fmaps[0], fmaps[1], audio, *model.pool.parameters(), *model.video_head.parameters()]
        return torch.autograd.grad(loss, params)

    weights, valid = windows(crops, (4, 7, 7))
    video = model.embed_tokens(torch.einsum("vskn,vbdn->vsbkd", weights, torch.stack(fmaps).flatten(3)), valid)
    terms = stica_terms(cfg.loss, 2, crop_layout(cfg.crops, (4, 7, 7)), "cpu")
    losses = terms(Keys.of_step({"video": video, "audio": audio}, has_audio))
    batched = cfg.loss.weight_va * losses["l_va"] + cfg.loss.weight_vv * losses["l_vv"]
    reference = loop_embeddings(model, fmaps, crops)
    expected, l_va, l_vv = loop_loss(cfg.loss, reference, audio, has_audio, crops)

    torch.testing.assert_close(video, torch.stack([torch.stack(r) for r in reference]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack([losses["l_va"], losses["l_vv"]]), torch.stack([l_va, l_vv]))
    torch.testing.assert_close(batched, expected)
    for got, want in zip(grads(batched), grads(expected)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_model_forward_runs_the_batched_path_on_real_clips():
    """Stica.forward with crop windows equals the trunk maps through the per-crop loop."""
    cfg = load_config("configs/demo.yaml", ["model.head_dropout=0.0"])
    torch.manual_seed(1)
    model = Stica(cfg.model).train()
    views = [torch.randn(4, 3, 16, 64, 64) for _ in range(2)]
    grid = feature_grid(16, 64, 64)
    crops = [sample_crops(cfg.crops, grid, np.random.default_rng(v)) for v in range(2)]
    out = model(views, torch.randn(4, 1, 64, 49), windows(crops, grid))
    fmaps = [model.video(v) for v in views]  # BN in training mode: the same statistics again
    expected = torch.stack([torch.stack(r) for r in loop_embeddings(model, fmaps, crops)])
    assert out["video"].shape == (2, 1 + len(crops[0]), 4, cfg.model.embed_dim) and out["audio"].shape == (4, 64)
    torch.testing.assert_close(out["video"], expected, rtol=1e-5, atol=1e-6)


def test_the_head_normalises_each_window_with_its_own_statistics():
    """Ghost BN: G runs in one call give each run's own BN output; the running statistics take one
    step towards the runs' mean statistics."""
    from stica.batchnorm import grouped_batch_norm

    torch.manual_seed(2)
    bn = torch.nn.BatchNorm1d(5)
    torch.nn.init.normal_(bn.weight)
    torch.nn.init.normal_(bn.bias)
    runs = [torch.randn(8, 5) * (1 + g) + g for g in range(3)]
    y = grouped_batch_norm(bn, torch.cat(runs), groups=3)
    for g, run in enumerate(runs):
        torch.testing.assert_close(y[8 * g:8 * (g + 1)], F.batch_norm(run, None, None, bn.weight, bn.bias, True))
    torch.testing.assert_close(bn.running_mean, 0.1 * torch.stack([r.mean(0) for r in runs]).mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * torch.stack([r.var(0) for r in runs]).mean(0))
    assert int(bn.num_batches_tracked) == 1


def test_nce_matches_a_direct_computation():
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    tau = 0.1
    direct = -sum(math.log(math.exp(float(q[i] @ k[i]) / tau) / sum(math.exp(float(q[i] @ k[j]) / tau)
                                                                      for j in range(5))) for i in range(5)) / 5
    assert abs(nce(q, k, tau).item() - direct) < 1e-5
    assert nce(q, q, 0.01).item() < 1e-3  # a query identical to its own key and far from others


def test_every_batched_term_equals_nce_on_the_same_inputs_and_the_group_means_the_old_totals():
    """116 terms of the paper's recipe (4 cross-modal with silent clips masked, 112 within-modal) in
    one bmm: each term is nce() of its pair; the groups are their means."""
    torch.manual_seed(4)
    layout = crop_layout(PAPER_CROPS, (4, 7, 7))
    cfg = load_config(CONFIG).loss
    video = F.normalize(torch.randn(2, 10, 6, 16), dim=-1)
    audio = F.normalize(torch.randn(6, 16), dim=1)
    has_audio = torch.tensor([True, False, True, True, False, True])
    keys = Keys.of_step({"video": video, "audio": audio}, has_audio)
    terms = stica_terms(cfg, 2, layout, "cpu")
    per_term = terms.per_term(keys)
    assert per_term.shape == (116,) and terms.slices == {"l_va": slice(0, 4), "l_vv": slice(4, 116)}
    flat = keys.local
    for p, (q, k) in enumerate(zip(terms.query.tolist(), terms.key.tolist())):
        masks = (has_audio, has_audio) if p < 4 else (None, None)
        torch.testing.assert_close(per_term[p], nce(flat[q], flat[k], 0.1 if p < 4 else 0.5, 0, *masks))
    pairs = within_modal_pairs(layout, layout)
    assert len(pairs) == 2 * ((4 + 5) ** 2 - 5 ** 2) == 112 and not any(layout[i].small and layout[j].small
                                                                       for _, i, j in pairs)
    old_vv = sum(nce(video[0][1 + i], video[1][1 + j], 0.5) + nce(video[1][1 + j], video[0][1 + i], 0.5)
                 for i, j in {(i, j) for _, i, j in pairs}) / 112
    old_va = sum(nce(a, b, 0.1, 0, has_audio, has_audio) for v in video[:, 0] for a, b in ((v, audio), (audio, v))) / 4
    losses = terms(keys)
    torch.testing.assert_close(losses["l_vv"], old_vv)
    torch.testing.assert_close(losses["l_va"], old_va)
    audible = stica_terms(cfg, 2, layout, "cpu")(Keys.of_step({"video": video[:, :, has_audio],
                                                               "audio": audio[has_audio]}))
    torch.testing.assert_close(losses["l_va"], audible["l_va"])  # silent clips: neither queries nor negatives
    silent = terms(Keys.of_step({"video": video, "audio": audio}, torch.zeros(6, dtype=torch.bool)))
    assert silent["l_va"].item() == 0.0  # an all-silent batch contributes nothing, and no NaN


def test_within_modal_pairs_of_the_released_code():
    """Per axis, large[1] of each view both ways, then every small crop of view 2 asking against
    every large crop of view 1: space 2 + 2x4, time 2 + 2x1."""
    c1 = c2 = crop_layout(PAPER_CROPS, (4, 7, 7))
    released = within_modal_pairs(c1, c2, "released")
    assert len(released) == 14
    large = lambda cs, axis: [i for i, c in enumerate(cs) if c.axis == axis and not c.small]
    for axis, smalls in (("space", 4), ("time", 1)):
        l1, l2 = large(c1, axis), large(c2, axis)
        assert (0, l1[1], l2[1]) in released and (1, l1[1], l2[1]) in released
        asked = [(i, j) for d, i, j in released if d == 1 and c2[j].small and c2[j].axis == axis]
        assert len(asked) == 2 * smalls and {i for i, _ in asked} == set(l1)
    assert not any(d == 0 and c2[j].small for d, i, j in released)
    terms = stica_terms(OmegaConf.create({"temp_va": 0.1, "temp_vv": 0.5, "vv_pairs": "released"}), 2, c1, "cpu")
    assert terms.slices["l_vv"] == slice(4, 18)
    with pytest.raises(ValueError, match="vv_pairs"):
        within_modal_pairs(c1, c2, "some")


def _gather_worker(rank, world, port, q, k, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    n = q.shape[0] // world
    ql = q[rank * n:(rank + 1) * n].clone().requires_grad_()
    kl = k[rank * n:(rank + 1) * n].clone().requires_grad_()
    Terms({"t": [(0, 1)]}, {"t": 0.2})(Keys(torch.stack([ql, kl])))["t"].backward()
    torch.save(torch.cat([ql.grad, kl.grad], dim=1), out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_cross_rank_negatives_give_the_gradients_of_the_global_loss(tmp_path):
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    world, n = 2, 3
    q, k = F.normalize(torch.randn(world * n, 5), dim=1), F.normalize(torch.randn(world * n, 5), dim=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Results come back as files: a Manager would fork a server from this multi-threaded process.
    mp.spawn(_gather_worker, args=(world, port, q, k, tmp_path), nprocs=world)
    # One process, whole batch: rank r's loss is its queries against all keys, positives at r*n + i.
    qf, kf = q.clone().requires_grad_(), k.clone().requires_grad_()
    logits = qf @ kf.T / 0.2
    total = sum(F.cross_entropy(logits[r * n:(r + 1) * n], torch.arange(n) + r * n) for r in range(world))
    total.backward()
    expected = torch.cat([qf.grad, kf.grad], dim=1)
    got = torch.cat([torch.load(tmp_path / f"rank{r}.pt") for r in range(world)])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_temporal_transformer_is_order_blind_as_released_and_not_with_positions():
    from stica.model import TemporalPooling

    cfg = load_config("configs/pretrain_kinetics.yaml").model.transformer  # layers 2, positional false, token first
    torch.manual_seed(0)
    h = torch.randn(3, 4, 512)
    shuffled = h[:, [2, 0, 3, 1]]
    # Output at the first token: permuting the others cannot matter without positions, only
    # what sits first; keep the first step in place to see that.
    keep_first = h[:, [0, 3, 1, 2]]
    blind = TemporalPooling(cfg).eval()
    with torch.no_grad():
        assert (blind(keep_first) - blind(h)).abs().max() < 1e-4
        assert (blind(shuffled) - blind(h)).abs().max() > 1e-3
    cfg.positional = True
    aware = TemporalPooling(cfg).eval()
    torch.nn.init.normal_(aware.pos.weight, std=1.0)
    with torch.no_grad():
        assert (aware(keep_first) - aware(h)).abs().max() > 1e-3
