"""The nvdec mode's machinery on the CPU: the session pool (scheduling, order, one decoder per
session, buffer reuse, failures) with PyAV sessions, and the mode's loader against the DALI graph
on time-coded shards. tests/test_gpu.py runs the same with NVDEC sessions."""
import gc
import json
import re
import time

import numpy as np
import pytest
import torch

from stica.config import load_config
from stica.pipelines.loader import DaliLoader, measured_fastest, resolve_device
from stica.pipelines.nvdec import NvdecLoader
from stica.pipelines.reference import decode_clip
from stica.pipelines.sessions import ClipJob, PyAVSession, SessionPool
from stica.shards import clip_pieces, parse_info, read_index, read_members, shard_paths, split_segments

from conftest import damage, level, pack_timecoded

NO_AUGMENT = ["data.jitter_prob=0", "data.grayscale_prob=0", "data.blur_prob=0", "data.flip_prob=0",
              "data.crop_scale=[1.0,1.0]", "data.crop_ratio=[1.3333,1.3334]", "data.mean=[0,0,0]",
              "data.std=[0.00392156862745098,0.00392156862745098,0.00392156862745098]", "data.views=1",
              "data.audio.volume_jitter=[1.0,1.0]"]  # views in pixel levels, audio untouched


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return pack_timecoded(tmp_path_factory.mktemp("timecoded"), short_side=64)


def config(shards, *overrides):
    return load_config("configs/pretrain_kinetics.yaml",
                       [f"data.shards={shards}", "data.batch_size=2", "data.threads=2", "data.device=cpu",
                        "data.sessions=2", *overrides]).data


def samples(shards):
    tars, idxs = shard_paths(shards, "train")
    out = []
    for tar, idx in zip(tars, idxs):
        with open(tar, "rb") as f:
            out += [(key, *read_members(f, members, ("segs", "info")).values()) for key, members in read_index(idx)]
    return out


def jobs_for(segs, info, starts, num_frames=30):
    meta, _ = parse_info(info)
    pieces = split_segments(segs, info)
    return [ClipJob(i, [(pieces[k], first, count) for k, first, count in
                        clip_pieces(s, num_frames, meta["seg_frames"], meta["num_frames"])],
                    np.zeros((num_frames, meta["height"], meta["width"], 3), np.uint8))
            for i, s in enumerate(starts)]


def test_clip_pieces_cover_the_clip_across_segment_edges():
    assert clip_pieces(0, 30, 30, 120) == [(0, 0, 30)]
    assert clip_pieces(29, 30, 30, 120) == [(0, 29, 1), (1, 0, 29)]
    assert clip_pieces(45, 60, 30, 120) == [(1, 15, 15), (2, 0, 30), (3, 0, 15)]
    assert clip_pieces(100, 30, 30, 110) == [(3, 10, 10)]  # the 20 frames past the end are edge-padded
    assert clip_pieces(0, 30, 30, 20) == [(0, 0, 20)]


def test_the_pool_decodes_every_clip_frame_exact_in_order_with_one_decoder_a_session(shards):
    """Clips at the segment edges and the last start, of two videos in one batch, over 3 sessions:
    each result in its job's place, frames equal to the reference loader's (PyAV, one container a
    segment), gray levels those of the time code; every session created one decoder for all."""
    (_, segs1, info1), (_, segs2, info2) = samples(shards)[:2]
    starts = [0, 29, 30, 59, 60, 90, 100]  # 120 frames: 100 runs 10 frames past the end
    jobs = jobs_for(segs1, info1, starts) + jobs_for(segs2, info2, starts[::-1])
    for j, job in enumerate(jobs):
        job.index = j
    pool = SessionPool(lambda slot: PyAVSession("vp9", slot), 3)
    try:
        results = pool.results(pool.submit(jobs))
        assert [r.index for r in results] == list(range(len(jobs))) and all(r.error is None for r in results)
        for job, start in zip(jobs, starts + starts[::-1]):
            segs, info = (segs1, info1) if job.index < len(starts) else (segs2, info2)
            np.testing.assert_array_equal(job.out, decode_clip(segs, info, start, 30))
            np.testing.assert_allclose(job.out.mean(axis=(1, 2, 3)), [level(min(start + t, 119)) for t in range(30)],
                                       atol=2)
        assert pool.decoders_created == [1, 1, 1] and sum(pool.clips) == len(jobs)
        assert len({r.slot for r in results}) > 1  # the work was shared
    finally:
        pool.close()


def test_a_clip_that_fails_is_named_and_the_rest_of_its_batch_decodes(shards):
    (_, segs, info), = samples(shards)[:1]
    jobs = jobs_for(segs, info, [0, 40, 80])
    broken = list(jobs[1].pieces[0])
    broken[0] = bytes(64) + broken[0][64:]
    jobs[1].pieces[0] = tuple(broken)
    pool = SessionPool(lambda slot: PyAVSession("vp9", slot), 2)
    try:
        results = pool.results(pool.submit(jobs))
        assert [r.error is None for r in results] == [True, False, True]
        assert results[1].error.startswith("segment 1 of the clip's 2:")
        np.testing.assert_allclose(jobs[2].out.mean(axis=(1, 2, 3)), [level(80 + t) for t in range(30)], atol=2)
        assert pool.decoders_created == [1, 1]  # a failure does not cost a session its decoder
        again = jobs_for(segs, info, [10])
        assert pool.results(pool.submit(again))[0].error is None
    finally:
        pool.close()


class _StuckSession:
    decoders_created = 1

    def begin(self, after):
        pass

    def decode(self, segment, first, count, out):
        time.sleep(1.0)


def test_a_stuck_decoder_stops_the_batch_with_a_reason_not_a_silent_hang():
    pool = SessionPool(lambda slot: _StuckSession(), 1, timeout=0.3)
    try:
        with pytest.raises(RuntimeError, match=re.escape("no result for clip(s) [0, 1] of a batch in 0 s")):
            pool.results(pool.submit([ClipJob(i, [(b"", 0, 1)], np.zeros((1, 2, 2, 3), np.uint8)) for i in range(2)]))
    finally:
        pool.close()
    with pytest.raises(ValueError, match="data.sessions must be at least 1"):
        SessionPool(lambda slot: _StuckSession(), 0)


def test_a_session_reads_h264_segments(tmp_path):
    """H.264 in MP4 reaches the decoder as Annex B, as NVDEC needs it (the DALI CPU graph cannot read it)."""
    shards = pack_timecoded(tmp_path, short_side=64, codec="h264", seconds=2.0)
    (_, segs, info), = samples(shards)[:1]
    jobs = jobs_for(segs, info, [0, 15, 30])
    pool = SessionPool(lambda slot: PyAVSession("h264", slot), 1)
    try:
        assert all(r.error is None for r in pool.results(pool.submit(jobs)))
        for job, start in zip(jobs, [0, 15, 30]):
            np.testing.assert_allclose(job.out.mean(axis=(1, 2, 3)), [level(min(start + t, 59)) for t in range(30)],
                                       atol=3)
    finally:
        pool.close()


def test_the_nvdec_mode_gives_the_dali_graphs_clips(shards):
    """Same seed, same clips: starts, keys, frames (within 3 levels: DALI's and FFmpeg's colour
    conversions) and audio; over two epochs each session keeps its one decoder and the frame
    buffers are allocated once."""
    cfg = config(shards, *NO_AUGMENT)
    dali, nvdec = DaliLoader(cfg), NvdecLoader(cfg, sessions="pyav")
    try:
        assert len(nvdec) == len(dali) == 4
        for epoch in range(2):
            pairs = list(zip(list(dali), list(nvdec), strict=True))
            for a, b in pairs:
                assert a["key"] == b["key"] and a["start"].tolist() == b["start"].tolist()
                assert a["label"].tolist() == b["label"].tolist() and b["has_audio"].all()
                assert (a["video"][0] - b["video"][0]).abs().max() <= 3.0
                torch.testing.assert_close(b["audio"], a["audio"], atol=1e-3, rtol=1e-4)
                for i, start in enumerate(b["start"].tolist()):
                    np.testing.assert_allclose(b["video"][0][i].mean(dim=(0, 2, 3)).numpy(),
                                               [level(start + t) for t in range(30)], atol=3)
        assert nvdec.pool.decoders_created == [1, 1] and sum(nvdec.pool.clips) == 2 * 4 * 2
        assert nvdec.ring.allocations == nvdec.RING_DEPTH * cfg.batch_size  # one frame size, one allocation a place
    finally:
        nvdec.close()


def test_the_nvdec_mode_names_a_damaged_sample_and_goes_on(tmp_path):
    shards = pack_timecoded(tmp_path, short_side=64)
    bad = damage(shards, 1)
    loader = NvdecLoader(config(shards, "data.views=1"), sessions="pyav")
    try:
        batches = list(loader)
        assert len(batches) == 4 and all(len(b["key"]) == 2 for b in batches)
        (record,) = loader.new_bad_samples
        assert record["key"] == bad and record["shard"] == "train-000000.tar" and record["epoch"] == 0
        assert record["reason"].startswith("segment 1 of the clip's")
        assert bad not in [k for b in batches for k in b["key"]]  # a valid clip of its batch stood in
        assert bad not in [k for b in loader for k in b["key"]]  # the next epoch reads a valid sample instead
        assert len(loader.bad_samples) == 1
        copies = loader.substitutes.dir
        assert [p.name for p in copies.iterdir()] == ["000000-train-000000.idx"]
    finally:
        loader.close()
    del loader
    gc.collect()
    assert not copies.exists()  # the private index copies go with the loader


def test_the_nvdec_mode_resumes_mid_epoch_without_decoding_the_batches_it_skips(shards):
    cfg = config(shards)
    whole = NvdecLoader(cfg, sessions="pyav")
    resumed = NvdecLoader(cfg, sessions="pyav", state={"epoch": 0, "batch": 2})
    try:
        expected = [(b["key"], b["start"].tolist()) for b in whole][2:]
        assert [(b["key"], b["start"].tolist()) for b in resumed] == expected
        assert sum(resumed.pool.clips) == 2 * cfg.batch_size and resumed.state_dict() == {"epoch": 1, "batch": 0}
    finally:
        whole.close()
        resumed.close()


def test_auto_picks_nvdec_only_where_a_gpu_check_measured_it_fastest(tmp_path, monkeypatch):
    """The gpu-check's report names the fastest loader mode per codec (not the decode-only SPDL
    row); data.gpu_check hands it to auto, on the GPU it was measured on only."""
    from stica.tools.gpu_loader import fastest_modes

    row = lambda codec, decode, rate: {"backend": "dali", "codec": codec, "decode": decode, "clips_per_s": rate}
    results = {"header": {"device": "NVIDIA H200"},
               "loader": [row("vp9", "hybrid", 160.0), row("vp9", "mixed", 24.0), row("vp9", "cpu", 60.0)],
               "nvdec": [row("vp9", "nvdec", 310.0), row("vp9", "spdl decode_packets_nvdec (decode only)", 900.0),
                         row("h264", "nvdec", 120.0), row("h264", "mixed", 140.0)]}
    results["fastest_mode"] = fastest_modes(results)
    assert results["fastest_mode"] == {"vp9": "nvdec", "h264": "mixed"}
    report = tmp_path / "results.json"
    report.write_text(json.dumps(results))
    assert measured_fastest(str(report), "vp9") is None  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert measured_fastest(str(report), "vp9") == "nvdec" and measured_fastest(str(report), "h264") == "mixed"
    assert resolve_device("auto", "vp9", 128, measured="nvdec") == "nvdec"
    assert resolve_device("auto", "vp9", 128, measured=None) == "hybrid"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert measured_fastest(str(report), "vp9") is None  # measured on another GPU
    assert resolve_device("nvdec", "h264", 128) == "nvdec"
    with pytest.raises(ValueError, match="below NVDEC's 128-px minimum"):
        resolve_device("nvdec", "vp9", 64)
