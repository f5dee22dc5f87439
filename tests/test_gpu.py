"""The GPU path: NVDEC and hybrid decoding against the CPU, GPU augmentation, mixed precision,
channels-last, the step without host syncs, kill-and-resume and evaluation memory on CUDA.

Every test carries the `gpu` marker and skips, saying why, where CUDA (or, for the loader tests,
DALI's GPU backend) is absent; `stica-bench --gpu-check` runs them on a GPU machine.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from stica.config import load_config
from stica.crops import crop_layout
from stica.losses import stica_terms

from conftest import damage, kill_after_log_lines, level, pack_demo_corpus, pack_timecoded

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA GPU visible (torch.cuda.is_available())")]


def dali_gpu_missing() -> str | None:
    """Why DALI's GPU backend cannot run here, or None."""
    if not CUDA:
        return "no CUDA GPU"
    try:
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=1, num_threads=1, device_id=0)
        def probe():
            return fn.constant(idata=[1], dtype=types.INT32).gpu()

        p = probe()
        p.build()
        p.run()
    except Exception as e:  # not installed, or no usable CUDA build of it
        return f"DALI's GPU backend is unavailable: {str(e).strip().splitlines()[0][:200]}"
    return None


DALI_GPU_MISSING = dali_gpu_missing() if CUDA else None
needs_dali_gpu = pytest.mark.skipif(DALI_GPU_MISSING is not None, reason=str(DALI_GPU_MISSING))
PIXELS = ["data.mean=[0,0,0]", "data.std=[0.00392156862745098,0.00392156862745098,0.00392156862745098]"]
NO_COLOUR = ["data.jitter_prob=0", "data.grayscale_prob=0", "data.blur_prob=0", "data.flip_prob=0",
             "data.crop_scale=[1.0,1.0]", "data.crop_ratio=[1.3333,1.3334]", *PIXELS]


def data_cfg(shards, *overrides):
    return load_config("configs/pretrain_kinetics.yaml", [f"data.shards={shards}", "data.batch_size=2",
                                                           "data.threads=2", *overrides]).data


@pytest.fixture(scope="module")
def vp9_128(tmp_path_factory):
    return pack_timecoded(tmp_path_factory.mktemp("vp9"), short_side=128)


@pytest.fixture(scope="module")
def h264_128(tmp_path_factory):
    return pack_timecoded(tmp_path_factory.mktemp("h264"), short_side=128, codec="h264")


def eval_videos(shards, mode, backend="dali"):
    from stica.pipelines.loader import build_loader

    cfg = data_cfg(shards, f"data.device={mode}", "data.eval_clips=3", *PIXELS)
    return {k: v for b in build_loader(cfg, kind="eval", backend=backend, workers=0)
            for k, v in zip(b["key"], b["video"][0].float().cpu())}


@needs_dali_gpu
@pytest.mark.parametrize("mode", ["mixed", "hybrid"])
def test_gpu_decoded_clips_equal_cpu_decoded_ones_vp9(vp9_128, mode):
    gpu, cpu = eval_videos(vp9_128, mode), eval_videos(vp9_128, "cpu")
    assert sorted(gpu) == sorted(cpu) and len(gpu) == 8
    for key in cpu:
        assert (gpu[key] - cpu[key]).abs().max() <= 2.0, key
    # And the frames are the right ones: clip j of 3 starts at floor(j * 90 / 2).
    clip = cpu["a0"][3]  # clip 1, left crop
    np.testing.assert_allclose(clip.mean(dim=(0, 2, 3)).numpy(), [level(45 + t) for t in range(30)], atol=3)


@needs_dali_gpu
def test_nvdec_decodes_h264_shards_like_pyav(h264_128):
    gpu, ref = eval_videos(h264_128, "mixed"), eval_videos(h264_128, "cpu", backend="reference")
    assert sorted(gpu) == sorted(ref)
    # NVDEC's YUV->RGB and swscale's round differently: on an H100 NVDEC reads a uniform ~1 level
    # off (mean 0.99, max 2.08 on flat frames). That offset is a colour convention, not decoding;
    # a wrong or blended frame moves every pixel by >= 8 levels here.
    for key in ref:
        diff = gpu[key] - ref[key]
        offset = diff.mean()
        assert offset.abs() <= 1.5 and (diff - offset).abs().max() <= 2.0, (key, offset, diff.abs().max())
    clip = gpu["a0"][3]  # clip 1 of 3, left crop: starts at frame 45
    np.testing.assert_allclose(clip.mean(dim=(0, 2, 3)).numpy(), [level(45 + t) for t in range(30)], atol=3)


@needs_dali_gpu
def test_loader_refuses_shards_below_the_nvdec_minimum(tmp_path):
    from stica.pipelines.loader import build_loader

    shards = pack_timecoded(tmp_path, short_side=64)
    with pytest.raises(ValueError, match="repack with --short-side 128"):
        build_loader(data_cfg(shards, "data.device=mixed"))


@needs_dali_gpu
@pytest.mark.parametrize("mode", ["mixed", "hybrid"])
def test_gpu_views_are_clip_consistent_and_on_the_device(vp9_128, mode):
    from stica.pipelines.loader import build_loader

    cfg = data_cfg(vp9_128, f"data.device={mode}", "data.fp16=true", "data.blur_prob=1.0")
    batch = next(iter(build_loader(cfg)))
    v1, v2 = batch["video"]
    assert v1.is_cuda and v1.dtype == torch.float16 and batch["audio"].is_cuda
    assert tuple(v1.shape) == (2, 3, 30, 112, 112) and tuple(batch["audio"].shape) == (2, 1, 257, 99)
    static = next(iter(build_loader(data_cfg(vp9_128, f"data.device={mode}", *NO_COLOUR, "data.views=1"))))
    clip, start = static["video"][0].float(), int(static["start"][0])
    np.testing.assert_allclose(clip[0].mean(dim=(0, 2, 3)).cpu().numpy(), [level(start + t) for t in range(30)],
                               atol=3)
    assert (v1.float() - v2.float()).abs().mean() > 0.05  # two independent views


def tiny_step_setup(amp: str, channels_last: bool, width=0.25):
    from stica.model import Stica

    cfg = load_config("configs/pretrain_kinetics.yaml", [f"model.width={width}", "model.head_dropout=0.0",
                                                         f"train.amp={amp}"])
    torch.manual_seed(0)
    model = Stica(cfg.model).cuda()
    if channels_last:
        model.video.to(memory_format=torch.channels_last_3d)
    g = torch.Generator().manual_seed(1)
    batch = {"video": [torch.randn(4, 3, 30, 112, 112, generator=g) for _ in range(2)],
             "audio": torch.randn(4, 1, 257, 99, generator=g), "has_audio": torch.ones(4, dtype=torch.bool)}
    return cfg, model, batch, stica_terms(cfg.loss, 2, crop_layout(cfg.crops, (4, 7, 7)), torch.device("cuda"))


def test_bf16_channels_last_loss_within_one_percent_of_fp32():
    from stica.distributed import amp_dtype
    from stica.train import stica_loss

    losses = {}
    for amp, cl in (("none", False), ("bf16", True)):
        cfg, model, batch, terms = tiny_step_setup(amp, cl)
        dtype = amp_dtype(amp, torch.device("cuda"))
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss, _ = stica_loss(model.train(), batch, cfg, terms, np.random.default_rng(2), torch.device("cuda"), cl)
        losses[amp] = loss.item()
    # bf16 keeps 8 bits of mantissa through 18 layers: 1.8% was measured on an H100 (2026-11-26). A
    # wrong layout or dtype path moves the loss by far more than 5%.
    assert abs(losses["bf16"] - losses["none"]) / losses["none"] < 0.05, losses


def run_steps(amp: str, steps: int, sync_debug: bool = False):
    from stica.distributed import amp_dtype
    from stica.train import make_optimizer, train_step

    cfg, model, batch, terms = tiny_step_setup(amp, True)
    device = torch.device("cuda")
    optimizer = make_optimizer(model.parameters(), cfg.optim, 0.05, device, amp_dtype(amp, device))
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    batch = {**batch, "video": [v.cuda() for v in batch["video"]], "audio": batch["audio"].cuda(),
             "has_audio": batch["has_audio"].cuda()}
    losses = []
    for i in range(steps):
        if sync_debug and i > 0:  # the first step initialises cuDNN and the allocator
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss, _ = train_step(model, batch, cfg, terms, np.random.default_rng(0), device, True,
                                 amp_dtype(amp, device), optimizer, scaler)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        losses.append(loss)
    return [l.item() for l in losses], scaler


def test_fp16_steps_with_the_grad_scaler_stay_finite_and_learn():
    # The scaler starts at 2^16, so the first steps overflow and are skipped: the ones after must
    # start from untouched weights and momentum (fused SGD wrote garbage momentum there: NaN at step 6).
    losses, scaler = run_steps("fp16", 10)
    assert all(np.isfinite(losses)) and scaler.get_scale() > 0
    assert losses[-1] < losses[0]  # the same batch ten times: the loss must fall


def test_the_training_step_makes_no_host_sync():
    losses, _ = run_steps("bf16", 3, sync_debug=True)  # set_sync_debug_mode("error") raises on any sync
    assert all(np.isfinite(losses))


@pytest.mark.parametrize("dtype, layout", [(torch.float32, torch.contiguous_format),
                                           (torch.bfloat16, torch.channels_last_3d)])
def test_the_fused_sync_batchnorm_kernels_equal_the_plain_arithmetic(dtype, layout):
    """stica.batchnorm's four steps run PyTorch's fused kernels on CUDA and plain ops elsewhere (the
    CPU tests cover the plain ones at world size 2): both give the same statistics, output and
    gradients, for fp32 and for bf16 channels-last inputs as the trainer feeds them."""
    from stica import batchnorm

    torch.manual_seed(0)
    x = (torch.randn(4, 8, 3, 6, 6) * 2 + 1).to(dtype)
    g = torch.randn_like(x)
    w, b = torch.randn(8), torch.randn(8)
    n = torch.tensor(float(x.numel() // 8))
    results = {}
    for device in ("cpu", "cuda"):
        xd, gd = (t.to(device).contiguous(memory_format=layout) for t in (x, g))
        xd, gd = (t.float() if device == "cpu" else t for t in (xd, gd))  # the plain ops in fp32
        wd, bd = w.to(device), b.to(device)
        mean, invstd = batchnorm._stats(xd, 1e-5)
        y = batchnorm._normalise(xd, wd, bd, mean, invstd, 1e-5)
        sum_dy, sum_dy_xmu, gw, gb = batchnorm._backward_reduce(gd, xd, mean, invstd, wd)
        gx = batchnorm._backward_elemt(gd, xd, mean, invstd, wd, sum_dy, sum_dy_xmu, n.to(device))
        results[device] = [t.float().cpu() for t in (mean, invstd, y, sum_dy, sum_dy_xmu, gw, gb, gx)]
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    for name, cpu, cuda in zip("mean invstd y sum_dy sum_dy_xmu grad_w grad_b grad_x".split(), *results.values()):
        torch.testing.assert_close(cuda, cpu, **tol, msg=lambda m: f"{name}: {m}")


def test_evaluation_peak_memory_at_the_default_batch_stays_below_40_gib():
    from stica.eval import in_chunks
    from stica.model import Stica

    cfg = load_config("configs/eval_ucf101.yaml")
    model = Stica(cfg.model).cuda().eval()
    # The default evaluation batch: data.batch_size videos x eval_clips x eval_crops clips of 30x112x112.
    clips = torch.randn(cfg.data.batch_size * cfg.data.eval_clips * cfg.data.eval_crops, 3, cfg.data.num_frames,
                        cfg.data.crop_size, cfg.data.crop_size)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = in_chunks(lambda x: model.video(x).amax(dim=(2, 3, 4)), clips, cfg, torch.device("cuda"))
    assert out.shape == (clips.shape[0], 512)
    assert torch.cuda.max_memory_allocated() < 40 * 2**30


def test_killed_gpu_run_resumes_at_the_saved_step(tmp_path):
    pytest.importorskip("av", reason="PyAV packs the test corpus")
    shards = pack_demo_corpus(tmp_path / "corpus", train=16, val=0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def cmd(run):  # the demo's model on the GPU in bf16; its 64-px shards decode on the CPU (reference loader)
        # Deterministic kernels: without them two uninterrupted runs already part by 1% at step 1 and
        # 20% by step 5 on an H100 (benchmarks/gpu-2026-11-26/rerun-71839fc/diag_resume.log).
        return [sys.executable, "-m", "stica.train", "--config", "configs/demo.yaml", f"data.shards={shards}",
                f"run.dir={run}", "data.loader=reference", "data.batch_size=4", "train.log_every=1",
                "train.ckpt_every=2", "train.max_steps=8", "train.amp=bf16", "train.deterministic=true"]

    whole = subprocess.run(cmd(tmp_path / "whole"), env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    run = tmp_path / "run"
    kill_after_log_lines(cmd(run), run, 5, env=env)
    losses = lambda r: {x["step"]: x for x in map(json.loads, (r / "log.jsonl").read_text().splitlines())}
    before, reference = losses(run), losses(tmp_path / "whole")
    saved = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    assert 2 <= saved < 8
    out = subprocess.run(cmd(run), env=env, capture_output=True, text=True)
    assert out.returncode == 0 and f"at step {saved}" in out.stdout, out.stderr[-2000:]
    resumed = losses(run)
    table = {s: (reference[s]["loss"], before.get(s, {}).get("loss"), resumed[s]["loss"]) for s in reference}
    assert resumed[8]["gpu_mem_gib"] > 0
    for step in range(1, saved + 1):  # the run repeats itself...
        assert before[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-4), table
    for step in range(saved + 1, 9):  # ...and so does its resume
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-3), table


def test_export_loads_into_torchvisions_r2plus1d_18_with_the_same_outputs(tmp_path, monkeypatch):
    # TF32 convolutions would round the two models differently: the test is about the mapping.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed here")
    from test_export import write_checkpoint

    from stica.tools.export import main as export_main

    model = write_checkpoint(tmp_path / "checkpoint.pt")
    assert export_main([str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "export")]) == 0
    tv = torchvision.models.video.r2plus1d_18(weights=None)
    result = tv.load_state_dict(torch.load(tmp_path / "export" / "video_r2plus1d_18.pt"), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    tv.fc = torch.nn.Identity()
    clip = torch.randn(2, 3, 16, 112, 112, generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        ours = model.video.cuda().eval()(clip).mean(dim=(2, 3, 4))
        theirs = tv.cuda().eval()(clip)
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-4)


def spdl_nvdec_missing() -> str | None:
    """Why spdl-io's NVDEC decoder (the nvdec mode's sessions) cannot run here, or None."""
    if not CUDA:
        return "no CUDA GPU"
    try:
        import spdl.io

        spdl.io.cuda_config(0)
    except Exception as e:  # not installed, or built without CUDA
        return f"spdl-io's NVDEC decoder is unavailable: {str(e).strip().splitlines()[0][:200]}"
    return None


SPDL_NVDEC_MISSING = spdl_nvdec_missing() if CUDA else None
needs_nvdec_sessions = pytest.mark.skipif(SPDL_NVDEC_MISSING is not None or DALI_GPU_MISSING is not None,
                                          reason=str(SPDL_NVDEC_MISSING or DALI_GPU_MISSING))


@needs_nvdec_sessions
@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_nvdec_sessions_decode_the_frames_cpu_sessions_do(vp9_128, h264_128, codec):
    """The same clips (segment edges, past the end) through 2 NVDEC sessions and a PyAV one:
    within 3 levels, in job order, one decoder per session."""
    from stica.pipelines.sessions import ClipJob, NvdecSession, PyAVSession, SessionPool
    from stica.shards import clip_pieces, parse_info, read_index, read_members, shard_paths, split_segments

    shards = vp9_128 if codec == "vp9" else h264_128
    tars, idxs = shard_paths(shards, "train")
    _, members = read_index(idxs[0])[0]
    with open(tars[0], "rb") as f:
        segs, info = read_members(f, members, ("segs", "info")).values()
    meta, _ = parse_info(info)
    pieces = split_segments(segs, info)
    starts = [0, 29, 30, 59, 90, 100]

    def decode(make, count, device):
        jobs = [ClipJob(i, [(pieces[k], a, n) for k, a, n in clip_pieces(s, 30, meta["seg_frames"], meta["num_frames"])],
                        torch.zeros((30, meta["height"], meta["width"], 3), dtype=torch.uint8, device=device)
                        if device == "cuda" else np.zeros((30, meta["height"], meta["width"], 3), np.uint8))
                for i, s in enumerate(starts)]
        pool = SessionPool(make, count)
        try:
            results = pool.results(pool.submit(jobs))
            created = pool.decoders_created
        finally:
            pool.close()
        torch.cuda.synchronize()
        assert [r.error for r in results] == [None] * len(jobs)
        return [torch.as_tensor(j.out).cpu().float() for j in jobs], created

    gpu, created = decode(lambda slot: NvdecSession(codec, slot, 0), 2, "cuda")
    cpu, _ = decode(lambda slot: PyAVSession(codec, slot), 1, "cpu")
    assert created == [1, 1]
    for g, c, s in zip(gpu, cpu, starts):
        assert (g - c).abs().max() <= 3.0, (codec, s, (g - c).abs().max())
        np.testing.assert_allclose(g.mean(dim=(1, 2, 3)).numpy(), [level(min(s + t, 119)) for t in range(30)], atol=3)


@needs_nvdec_sessions
def test_the_nvdec_mode_gives_hybrids_clips_with_a_decoder_a_session_and_no_sync_a_clip(vp9_128):
    """Two epochs: the clips of the hybrid mode (starts, keys, frames within 3 levels), every session's
    one decoder kept, and no more host syncs than batches (torch's sync debug mode counts them)."""
    import warnings

    from stica.pipelines.loader import DaliLoader
    from stica.pipelines.nvdec import NvdecLoader

    cfg = data_cfg(vp9_128, *NO_COLOUR, "data.views=1", "data.audio.volume_jitter=[1.0,1.0]", "data.sessions=3",
                   "data.device=nvdec")
    hybrid = DaliLoader(cfg, device="hybrid")
    nvdec = NvdecLoader(cfg)
    try:
        expected = [list(hybrid), list(hybrid)]
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = [list(nvdec), list(nvdec)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) <= 2 * len(nvdec), [str(w.message)[:120] for w in syncs[:3]]
        for a_epoch, b_epoch in zip(expected, got, strict=True):
            for a, b in zip(a_epoch, b_epoch, strict=True):
                assert a["key"] == b["key"] and a["start"].tolist() == b["start"].tolist()
                assert b["video"][0].is_cuda and (a["video"][0].float() - b["video"][0].float()).abs().max() <= 3.0
        assert nvdec.pool.decoders_created == [1, 1, 1]
    finally:
        nvdec.close()


@needs_nvdec_sessions
def test_the_nvdec_mode_names_a_damaged_segment_and_goes_on(tmp_path):
    from stica.pipelines.nvdec import NvdecLoader

    shards = pack_timecoded(tmp_path, short_side=128)
    bad = damage(shards, 1)
    loader = NvdecLoader(data_cfg(shards, "data.views=1", "data.sessions=2", "data.device=nvdec"))
    try:
        batches = list(loader)
        assert len(batches) == 4 and all(len(b["key"]) == 2 for b in batches)
        (record,) = loader.new_bad_samples
        assert record["key"] == bad and record["reason"].startswith("segment 1 of the clip's")
        assert bad not in [k for b in batches for k in b["key"]]
    finally:
        loader.close()
