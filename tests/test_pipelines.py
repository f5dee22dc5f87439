"""DALI pipelines and the reference loader on generated, time-coded shards (CPU)."""
import math

import numpy as np
import pytest
import torch

from stica.config import load_config
from stica.media import decoder_missing
from stica.pipelines.loader import build_loader
from stica.pipelines.reference import mel_filters
from stica.tools.shard import main as shard_main
from stica.tools.synth import write_av

from conftest import CHIRP, chirp, level, pack_timecoded

SIZE = (96, 72)
# The torchcodec loader is an optional extra (the peer in stica-bench's loader table).
TORCHCODEC_MISSING = decoder_missing("torchcodec")
TORCHCODEC = pytest.param("torchcodec", marks=pytest.mark.skipif(
    bool(TORCHCODEC_MISSING), reason=f"torchcodec (optional) cannot run here: {TORCHCODEC_MISSING}"))
SPDL_MISSING = decoder_missing("spdl")
SPDL = pytest.param("spdl", marks=pytest.mark.skipif(
    bool(SPDL_MISSING), reason=f"spdl-io cannot decode here (FFmpeg's shared libraries?): {SPDL_MISSING}"))
LOADERS = ["dali", "reference", TORCHCODEC, SPDL]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return pack_timecoded(tmp_path_factory.mktemp("timecoded"), short_side=64)


@pytest.fixture(scope="module")
def static_shards(tmp_path_factory):
    """A still, textured picture: any difference between frames of a view is augmentation's doing."""
    root = tmp_path_factory.mktemp("static")
    yy, xx = np.mgrid[0:SIZE[1], 0:SIZE[0]]
    picture = np.stack([xx * 255 // SIZE[0], yy * 255 // SIZE[1], (xx // 12 + yy // 12) % 2 * 200], -1).astype(np.uint8)
    (root / "videos" / "still").mkdir(parents=True)
    for i in range(4):
        write_av(root / "videos" / "still" / f"s{i}.mkv", lambda t: picture, [j / 30 for j in range(60)],
                 chirp, size=SIZE)
    shard_main(["pack", "--root", str(root / "videos"), "--out", str(root / "shards"), "--short-side", "64"])
    return root / "shards"


def config(shards, *overrides):
    # The CPU graph, on purpose (these shards are packed at 64 px, below NVDEC's minimum); tests/test_gpu.py
    # checks the GPU modes.
    return load_config("configs/pretrain_kinetics.yaml",
                       [f"data.shards={shards}", "data.batch_size=2", "data.threads=2", "data.device=cpu",
                        *overrides]).data


NO_COLOUR = ["data.jitter_prob=0", "data.grayscale_prob=0", "data.blur_prob=0", "data.flip_prob=0",
             "data.crop_scale=[1.0,1.0]", "data.crop_ratio=[1.3333,1.3334]", "data.mean=[0,0,0]",
             "data.std=[0.00392156862745098,0.00392156862745098,0.00392156862745098]"]  # output in pixel levels


def peak_hz(spec_column, cfg):
    """Centre frequency of the loudest mel filter."""
    filters = mel_filters(cfg.audio.n_mels, cfg.audio.nfft, cfg.audio.rate)
    freqs = torch.arange(filters.shape[1]) * cfg.audio.rate / cfg.audio.nfft
    centres = (filters * freqs).sum(1) / filters.sum(1).clamp_min(1e-9)
    return float(centres[int(torch.argmax(spec_column))])


def test_pretrain_batch_shapes_and_types(shards):
    cfg = config(shards)
    batch = next(iter(build_loader(cfg)))
    assert [tuple(v.shape) for v in batch["video"]] == [(2, 3, 30, 112, 112)] * 2
    assert batch["video"][0].dtype == torch.float32
    assert tuple(batch["audio"].shape) == (2, 1, 257, 99) and batch["audio"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and set(batch["label"].tolist()) <= {0, 1}
    assert all(k[0] in "ab" and k[0] == "ab"[l] for k, l in zip(batch["key"], batch["label"].tolist()))
    assert batch["has_audio"].all()


@pytest.mark.parametrize("backend", LOADERS)
def test_clip_frames_and_audio_window_follow_the_clip_start(shards, backend):
    cfg = config(shards, *NO_COLOUR, "data.views=1", "data.audio.volume_jitter=[1.0,1.0]")
    seen = 0
    for batch in build_loader(cfg, backend=backend, workers=0):
        for i, start in enumerate(batch["start"].tolist()):
            frames = batch["video"][0][i].mean(dim=(0, 2, 3))  # gray level of each of the 30 frames
            np.testing.assert_allclose(frames.numpy(), [level(start + j) for j in range(30)], atol=3)
            # The first spectrogram column covers the 20 ms after the clip's first frame.
            expected = CHIRP(start / 30 + 0.01)
            assert abs(peak_hz(batch["audio"][i, 0, :, 0], cfg) - expected) < 40, (start, expected)
            expected_end = CHIRP(start / 30 + 0.98)
            assert abs(peak_hz(batch["audio"][i, 0, :, -1], cfg) - expected_end) < 40
            seen += 1
    assert seen == 8


def test_each_view_is_consistent_over_time_and_views_differ(static_shards):
    batch = next(iter(build_loader(config(static_shards))))
    v1, v2 = batch["video"]
    for view in (v1, v2):
        per_frame = (view - view[:, :, :1]).abs().mean(dim=(1, 3, 4))  # [B, T]: change from frame 0
        assert per_frame.max() < 0.05
    assert (v1 - v2).abs().mean(dim=(1, 2, 3, 4)).min() > 0.2


def colour_only(*changes: str):
    """Views whose only change is the colour jitter given (every view jittered), in pixel levels."""
    return load_config("configs/pretrain_kinetics.yaml", [
        "data.crop_scale=[1.0,1.0]", "data.crop_ratio=[1.0,1.0]", "data.flip_prob=0", "data.grayscale_prob=0",
        "data.blur_prob=0", "data.jitter_prob=1", "data.brightness=0", "data.contrast=0", "data.saturation=0",
        "data.mean=[0,0,0]", "data.std=[0.00392156862745098,0.00392156862745098,0.00392156862745098]",
        "data.crop_size=8", *changes]).data


def views_of_one_clip(backend: str, clip: np.ndarray, cfg, n: int = 16) -> list[torch.Tensor]:
    """n independent views (3,T,H,W) of one T,H,W,3 uint8 clip from either loader's view code."""
    if backend == "reference":
        from stica.pipelines.reference import video_view

        rng = np.random.default_rng(0)
        return [video_view(torch.from_numpy(clip), cfg, rng) for _ in range(n)]
    from nvidia.dali import fn, pipeline_def, types

    from stica.pipelines.pretrain import video_view

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, enable_conditionals=True, seed=1)
    def views():
        x = fn.external_source(source=lambda: [clip] * n, batch=True, layout="FHWC")
        return video_view(x, cfg, types.FLOAT, "cpu")

    pipe = views()
    pipe.build()
    (out,) = pipe.run()
    return [torch.from_numpy(np.array(out.at(i))) for i in range(n)]


def test_cpu_blur_equals_dalis_gaussian_blur_on_decoded_frames(tmp_path):
    """The CPU graph blurs with fn.filter and taps it computes per clip (5x cheaper than DALI's
    CPU gaussian_blur); on decoded frames of a real-looking clip, for sigmas from 3 to 11 taps
    and past the window cap, every pixel must be within 1 level of gaussian_blur's."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    from stica.media import decode_segment
    from stica.pipelines.pretrain import blur
    from stica.tools.synth import write_scene

    path = write_scene(tmp_path / "scene.webm", seed=3, seconds=0.4)
    clip = np.ascontiguousarray(np.stack(decode_segment(path.read_bytes()))[:8, :64, :96])
    sigmas = [0.1, 0.6, 1.2, 1.9, 3.0]

    @pipeline_def(batch_size=len(sigmas), num_threads=1, device_id=None)
    def both():
        x = fn.external_source(source=lambda: [clip] * len(sigmas), batch=True, layout="FHWC")
        sigma = fn.external_source(source=lambda: [np.float32(s) for s in sigmas], batch=True)
        window = fn.cast(dmath.min(dmath.ceil(sigma * 3.0), 5.0), dtype=types.INT32) * 2 + 1
        return blur(x, sigma, 11, "cpu"), fn.gaussian_blur(x, window_size=window, sigma=sigma)

    pipe = both()
    pipe.build()
    ours, reference = pipe.run()
    for i, sigma in enumerate(sigmas):
        a, b = np.array(ours.at(i)).astype(int), np.array(reference.at(i)).astype(int)
        assert a.shape == clip.shape
        assert np.abs(a - b).max() <= 1, sigma
        assert (sigma < 0.3) or np.abs(a - clip).mean() > 0.5  # it did blur


@pytest.mark.parametrize("gray", [0, 1])
@pytest.mark.parametrize("backend", ["dali", "reference"])
def test_contrast_pivots_on_the_clip_mean_grey(backend, gray):
    """As torchvision's ColorJitter (the released code's): contrast scales the distance from the
    mean grey, of the whole clip here (one colour change per clip), so that mean is kept. DALI's
    color_twist pivots at mid-range (128), which moved this clip's mean by up to 29 levels. The
    same on grayscale clips, whose jitter DALI runs on one channel."""
    clip = np.full((4, 8, 8, 3), 40, np.uint8)
    clip[:, :, 4:] = 80
    clip[2:] += 20  # frames 0-1: 40 | 80, frames 2-3: 60 | 100; clip mean grey 70, far from 128
    cfg = colour_only("data.contrast=0.5", f"data.grayscale_prob={gray}")
    views = [v[0] for v in views_of_one_clip(backend, clip, cfg)]  # red: T,H,W
    factors = []
    for v in views:
        assert abs(v.mean().item() - 70) < 1.0
        c = (v[0, 0, 4] - v[0, 0, 0]).item() / 40  # this view's contrast factor
        frame_means = v.mean(dim=(1, 2))
        assert abs((frame_means[2] - frame_means[0]).item() - 20 * c) < 1.0  # one pivot for the clip
        factors.append(c)
    assert min(factors) < 0.9 and max(factors) > 1.1  # the factor does vary over [0.5, 1.5]


@pytest.mark.parametrize("backend", ["dali", "reference"])
def test_grayscale_is_the_luma_of_the_jittered_clip(backend):
    """Grayscale after the jitter: every channel is the luma of the jittered pixel (saturation
    no longer matters), brightness scales it, and one clamp at the end keeps it in [0, 255]."""
    clip = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    luma = clip.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # T,H,W
    for changes, scale in ((["data.saturation=0.4"], 1.0), (["data.brightness=0.5", "data.jitter_prob=1"], None)):
        views = views_of_one_clip(backend, clip, colour_only("data.grayscale_prob=1", *changes), n=8)
        drawn = []
        for v in views:
            assert (v[0] == v[1]).all() and (v[1] == v[2]).all()
            dark = luma < 150  # unclipped at any brightness drawn
            b = scale or float(np.median(v[0].numpy()[dark] / np.maximum(luma[dark], 1)))  # this view's brightness
            np.testing.assert_allclose(v[0].numpy(), np.clip(luma * b, 0, 255), atol=1.5)
            drawn.append(b)
        assert scale or (min(drawn) < 0.9 and max(drawn) > 1.1)  # the brightness does vary over [0.5, 1.5]


def test_reference_hue_turn_equals_dalis_color_twist():
    from nvidia.dali import fn, pipeline_def, types

    from stica.pipelines.reference import rotate_hue

    clip = np.random.default_rng(0).integers(30, 225, (2, 8, 8, 3), dtype=np.uint8)
    for degrees in (30.0, -90.0, 135.0):
        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def twist():
            x = fn.external_source(source=lambda: [clip], batch=True, layout="FHWC")
            return fn.color_twist(x, hue=degrees, dtype=types.FLOAT)

        pipe = twist()
        pipe.build()
        dali = torch.from_numpy(np.array(pipe.run()[0][0]))
        ours = rotate_hue(torch.from_numpy(clip).permute(0, 3, 1, 2).float(), degrees).permute(0, 2, 3, 1)
        assert (dali - ours).abs().max() < 1e-3


@pytest.mark.parametrize("backend", ["dali", "reference"])
def test_hue_jitter_turns_each_clip_by_one_angle_and_keeps_luma(backend):
    """data.hue: one chroma turn per view, drawn from [-hue, hue] degrees; luma and chroma
    strength stay (muted colours, so that no channel clips)."""
    from stica.pipelines.reference import RGB_TO_YIQ

    clip = np.empty((4, 8, 8, 3), np.uint8)
    clip[:, :, :4], clip[:, :, 4:] = (140, 110, 90), (90, 115, 140)
    views = views_of_one_clip(backend, clip, colour_only("data.hue=180"))
    yiq = lambda rgb: RGB_TO_YIQ @ torch.as_tensor(rgb, dtype=torch.float32)
    angles = []
    for v in views:  # 3,T,H,W pixel levels
        turns = []
        for column, colour in ((0, clip[0, 0, 0]), (7, clip[0, 0, 7])):
            before, after = yiq(colour), yiq(v[:, :, :, column].mean(dim=(1, 2)))
            assert abs(after[0] - before[0]) < 1.0  # luma kept
            assert abs(after[1:].norm() - before[1:].norm()) < 1.5  # chroma strength kept
            turn = math.degrees(math.atan2(after[2], after[1]) - math.atan2(before[2], before[1]))
            turns.append((turn + 180) % 360 - 180)
        gap = (turns[0] - turns[1] + 180) % 360 - 180
        assert abs(gap) < 3.0  # one angle for the whole clip
        assert v[:, :, :, 0].std(dim=1).max() < 1.0  # and for every frame
        angles.append(turns[0])
    assert max(angles) - min(angles) > 180  # the angle does vary over [-180, 180]


def test_two_ranks_cover_every_sample_once_with_equal_batch_counts(shards):
    keys, counts = [], []
    for rank in range(2):
        loader = build_loader(config(shards), rank=rank, world=2)
        batches = list(loader)
        counts.append((len(loader), len(batches)))
        keys += [k for b in batches for k in b["key"]]
    assert counts == [(2, 2), (2, 2)]
    assert sorted(keys) == sorted(f"{c}{i}" for c in "ab" for i in range(4))


def test_uneven_split_still_gives_equal_batch_counts(shards):
    # 8 videos over 3 ranks: DALI sizes each rank's epoch by floor(8 / 3) = 2 samples.
    loaders = [build_loader(config(shards), rank=r, world=3) for r in range(3)]
    assert [(len(l), len(list(l))) for l in loaders] == [(1, 1)] * 3


@pytest.mark.parametrize("batch_size, world", [(2, 1), (3, 1), (2, 2)])
def test_an_epoch_runs_its_pipeline_only_for_the_batches_it_reads(shards, batch_size, world):
    """Each epoch has a pipeline of its own, so a run queued past the epoch's end (DALI's own
    iterator keeps `prefetch` of them, for a next epoch of the same pipeline) is decoded for
    nothing. The DROP policy's incomplete last batch is still read: it ends the epoch. (An
    epoch shorter than the queue still fills it when the pipeline starts.)"""
    from stica.pipelines.loader import DaliLoader

    for rank in range(world):
        loader = DaliLoader(config(shards, f"data.batch_size={batch_size}"), rank=rank, world=world)
        for epoch in range(2):
            iterator = loader._build(epoch)
            assert sum(1 for _ in iterator) == len(loader)
            assert iterator._pipes[0].empty()  # nothing left queued


def test_same_seed_same_batch_and_another_seed_differs(shards):
    first = lambda *o: next(iter(build_loader(config(shards, *o))))
    a, b, c = first(), first(), first("data.seed=5")
    torch.testing.assert_close(a["video"][0], b["video"][0])
    torch.testing.assert_close(a["audio"], b["audio"])
    assert not torch.equal(a["video"][0], c["video"][0])


def test_sixty_frame_clips(shards):
    cfg = config(shards, "data.num_frames=60", *NO_COLOUR)
    batch = next(iter(build_loader(cfg)))
    assert tuple(batch["video"][0].shape) == (2, 3, 60, 112, 112)
    assert tuple(batch["audio"].shape) == (2, 1, 257, 199)
    start = int(batch["start"][0])
    np.testing.assert_allclose(batch["video"][0][0].mean(dim=(0, 2, 3)).numpy(),
                               [level(start + j) for j in range(60)], atol=3)


@pytest.mark.parametrize("backend", LOADERS)
def test_evaluation_takes_uniform_clips_and_three_crops(shards, backend):
    cfg = config(shards, *NO_COLOUR, "data.eval_clips=4")
    batch = next(iter(build_loader(cfg, kind="eval", backend=backend, workers=0)))
    video = batch["video"][0]
    assert tuple(video.shape) == (2, 4 * 3, 3, 30, 112, 112)
    expected_starts = [0, 30, 60, 90]  # 120 frames, 30-frame clips: floor(j * 90 / 3)
    assert batch["start"].tolist() == [expected_starts] * 2
    for j, s in enumerate(expected_starts):
        for crop in range(3):
            np.testing.assert_allclose(video[0, 3 * j + crop].mean(dim=(0, 2, 3)).numpy(),
                                       [level(s + t) for t in range(30)], atol=3)
    assert tuple(batch["audio"].shape) == (2, 4, 1, 257, 99)


def test_reference_and_dali_log_mel_agree(shards):
    cfg = config(shards, "data.eval_clips=2", "data.eval_crops=1")
    dali = next(iter(build_loader(cfg, kind="eval")))
    ref = next(iter(build_loader(cfg, kind="eval", backend="reference", workers=0)))
    assert dali["key"] == ref["key"]
    loud = dali["audio"] > -20  # compare where there is signal; the floor is identical by construction
    torch.testing.assert_close(dali["audio"][loud], ref["audio"][loud], atol=0.05, rtol=0.01)


def test_decode_device_rules(monkeypatch):
    from stica.pipelines.loader import resolve_device

    assert resolve_device("auto", "vp9", 128) == "cpu"  # no GPU here
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_device("hybrid", "vp9", 128)
    with pytest.raises(ValueError, match="decode only on the GPU"):
        resolve_device("cpu", "h264", 128)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", "vp9", 128) == "hybrid" and resolve_device("auto", "h264", 128) == "mixed"
    assert resolve_device("mixed", "vp9", 128) == "mixed" and resolve_device("cpu", "vp9", 64) == "cpu"
    with pytest.raises(ValueError, match="below NVDEC's 128-px minimum for vp9; repack with --short-side 128"):
        resolve_device("mixed", "vp9", 64, "/data/shards")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_device("gpu", "vp9", 128)


SOAK = """
import json, sys
from stica.config import load_config
from stica.pipelines.loader import build_loader
from stica.tools.bench_loader import soak
shards, backend, kind = sys.argv[1:]
cfg = load_config("configs/pretrain_kinetics.yaml", [f"data.shards={shards}", "data.batch_size=8", "data.threads=2",
                  "data.device=cpu", "data.eval_clips=2"]).data
print(json.dumps(soak(build_loader(cfg, kind=kind, backend=backend, workers=1), epochs=40)))
"""


@pytest.mark.parametrize("backend, kind", [("dali", "pretrain"), ("dali", "eval"), ("reference", "pretrain")])
def test_resident_memory_stays_flat_across_epochs(tmp_path_factory, backend, kind):
    """40 epochs of a 16-video set (2 batches each): after the first 8, while pools fill, resident
    memory may not grow by more than 2 MiB per epoch (the DALI loaders grew 11-17 MiB per epoch
    before the finished epoch's pipeline was released, and some runs still drifted by ~5 until
    glibc's heap was trimmed at each epoch end). In a process of its own: the test runner's
    memory, gigabytes after the other tests, moves by tens of MiB on its own and hid the slope."""
    import json
    import subprocess
    import sys

    from conftest import pack_demo_corpus
    from stica.tools.bench_loader import growth_per_epoch

    shards = pack_demo_corpus(tmp_path_factory.mktemp("soak"), train=16, val=0)
    out = subprocess.run([sys.executable, "-c", SOAK, str(shards), backend, kind], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    assert growth_per_epoch(rss, skip=8) < 2.0, " ".join(str(round(r)) for r in rss)


def test_imports_run_one_way():
    """tools and pipelines build on stica's core; the core's building blocks import neither, and
    pipelines never reach into tools (the entry points train.py and eval.py sit on top of all)."""
    import ast
    from pathlib import Path

    def imports(path):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    for path in Path("pipelines").glob("*.py"):
        assert not {m for m in imports(path) if m.startswith("stica.tools")}, path
    for path in Path("stica").glob("*.py"):
        if path.stem in ("train", "eval"):
            continue
        assert not {m for m in imports(path) if m.startswith(("stica.tools", "stica.pipelines"))}, path


@pytest.mark.parametrize("backend", LOADERS)
def test_decoding_is_frame_exact_at_segment_edges_and_the_last_start(shards, backend):
    """Clips starting at every frame 0..90 (eval_clips=91 over 120 frames): the segment edges
    (29, 30, 59, 60) and the last start F-T = 90 included; a frame off by one is 8 levels off."""
    cfg = config(shards, *NO_COLOUR, "data.eval_clips=91", "data.eval_crops=1", "data.batch_size=1")
    batch = next(iter(build_loader(cfg, kind="eval", backend=backend, workers=0)))
    assert batch["start"][0].tolist() == list(range(91))
    levels = batch["video"][0][0].mean(dim=(1, 3, 4))  # clips x frames
    for s in (0, 1, 29, 30, 31, 59, 60, 89, 90):
        np.testing.assert_allclose(levels[s].numpy(), [level(s + t) for t in range(30)], atol=2, err_msg=str(s))


def test_dali_and_reference_loaders_decode_the_same_pixels(shards):
    cfg = config(shards, *NO_COLOUR, "data.eval_clips=3", "data.eval_crops=3")
    dali = {k: v for b in build_loader(cfg, kind="eval") for k, v in zip(b["key"], b["video"][0])}
    ref = {k: v for b in build_loader(cfg, kind="eval", backend="reference", workers=0)
           for k, v in zip(b["key"], b["video"][0])}
    assert sorted(dali) == sorted(ref) and len(dali) == 8
    for key in dali:
        assert (dali[key] - ref[key]).abs().max() <= 2.0, key


def test_torchcodec_loader_says_why_it_cannot_run(shards, monkeypatch):
    import stica.pipelines.reference as reference

    monkeypatch.setattr(reference, "decoder_missing", lambda name: "RuntimeError: Could not load libtorchcodec")
    with pytest.raises(RuntimeError, match="Could not load libtorchcodec.*data.loader=reference"):
        build_loader(config(shards), backend="torchcodec")


def test_audio_window_is_aligned_to_its_first_frame_within_10_ms(shards):
    """Fit the time offset of each clip's spectrogram against spectrograms of the known chirp
    computed at offsets of -60..60 ms: the best fit must be within 10 ms of the clip's start."""
    from stica.pipelines.reference import log_mel

    cfg = config(shards, *NO_COLOUR, "data.views=1", "data.audio.volume_jitter=[1.0,1.0]")
    rate = cfg.audio.rate
    filters = mel_filters(cfg.audio.n_mels, cfg.audio.nfft, rate)
    offsets_ms = np.arange(-60, 61, 2)
    checked = 0
    for batch in build_loader(cfg):
        for spec, start in zip(batch["audio"], batch["start"].tolist()):
            t0 = start / 30
            errors = []
            for off in offsets_ms:
                t = t0 + off / 1000 + np.arange(rate) / rate
                expected = log_mel(torch.from_numpy(chirp(t).astype(np.float32) * 32767), cfg.audio, filters)
                loud = expected > expected.max() - 30
                errors.append(float((expected - spec)[loud].abs().mean()))
            best = offsets_ms[int(np.argmin(errors))]
            assert abs(best) <= 10, (start, best)
            checked += 1
    assert checked == 8


def test_a_clips_audio_comes_from_its_segments_alone_and_equals_the_tracks_window(shards):
    """The graph and the reference loader decode only the audio segments a clip's second touches:
    the samples must equal that second of the whole track, at a segment's start, inside one, across
    a seam, at the last clip start and running past the end (zeros there)."""
    from nvidia.dali import fn, pipeline_def, types

    from stica.media import decode_track
    from stica.pipelines.clips import audio_clip, read_shards
    from stica.pipelines.reference import audio_clip as reference_audio_clip
    from stica.shards import parse_info, read_index, shard_paths

    tars, idxs = shard_paths(shards, "train")
    starts = [0, 30, 47, 59, 90, 110]  # 4-s videos, 30-frame (1-s) segments
    members = []
    for tar, idx in zip(tars, idxs):
        with open(tar, "rb") as f:
            for _, m in read_index(idx):
                members.append({ext: (f.seek(m[ext][0]), f.read(m[ext][1]))[1] for ext in ("flac", "info")})
    members = members[:len(starts)]

    @pipeline_def(batch_size=len(starts), num_threads=1, device_id=None)
    def windows():
        _, flac, info, _ = read_shards(tars, idxs, 0, 1, shuffle=False, shuffle_buffer=1, seed=0)
        start = fn.external_source(source=lambda: [np.int32(s) for s in starts], batch=True, dtype=types.INT32)
        return audio_clip(flac, info, start, 30, 1.0, 24000, 30)

    pipe = windows()
    pipe.build()
    (out,) = pipe.run()
    for i, (start, m) in enumerate(zip(starts, members)):
        meta, _ = parse_info(m["info"])
        track = decode_track(m["flac"], m["info"]).astype(np.float32)
        expected = np.pad(track[start * 800:][:24000], (0, max(0, 24000 - len(track[start * 800:]))))
        assert meta["num_frames"] == 120
        np.testing.assert_array_equal(np.array(out.at(i)), expected, err_msg=f"start {start}")
        np.testing.assert_array_equal(reference_audio_clip(m["flac"], m["info"], start, 1.0).numpy(), expected)
    assert np.abs(np.array(out.at(5))[10 * 800:]).max() == 0 and np.abs(np.array(out.at(5))[: 10 * 800]).max() > 1000


def test_dali_loader_resumes_mid_epoch_and_rotates_data_across_ranks(shards):
    cfg = config(shards, "data.batch_size=1")
    fresh = build_loader(cfg)
    list(fresh)  # epoch 0
    epoch1 = [b for b in fresh]
    resumed = list(build_loader(cfg, state={"epoch": 1, "batch": 1}))
    assert len(resumed) == len(epoch1) - 1 == 7
    for a, b in zip(resumed, epoch1[1:]):
        assert a["key"] == b["key"]
        torch.testing.assert_close(a["video"][0], b["video"][0])
        torch.testing.assert_close(a["audio"], b["audio"])
    # Shard (rank + epoch) % world: what rank 1 reads in epoch 0, rank 0 reads in epoch 1.
    keys = lambda rank, epoch: sorted(k for b in build_loader(cfg, rank=rank, world=2, state={"epoch": epoch, "batch": 0})
                                      for k in b["key"])
    assert keys(0, 1) == keys(1, 0) and keys(0, 0) == keys(1, 1) and not set(keys(0, 0)) & set(keys(1, 0))
