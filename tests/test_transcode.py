"""Transcoding one input: constant frame rate, audio alignment, every bad-input reason."""
import numpy as np
import pytest

from stica.shards import parse_info, split_audio, split_segments
from stica.tools.synth import gray_frame, write_av
from stica.media import decode_flac, decode_segment, decode_track
from stica.tools.transcode import PackError, PackOptions, encode_flac, transcode

from conftest import SIZE, make_clip

OPTS = PackOptions(short_side=64, seg_frames=10)


def frames_of(result):
    m = result["members"]
    return [f for seg in split_segments(m["segs"], m["info"]) for f in decode_segment(seg)]


def test_vfr_becomes_cfr_with_the_right_frames(tmp_path):
    # 2 s of source frames with irregular gaps (VFR); frame i shows gray level 10 + 6 i.
    rng = np.random.default_rng(0)
    times = np.cumsum(np.r_[0, rng.uniform(0.02, 0.08, 40)])
    times = times[times < 2.0]
    path = write_av(tmp_path / "vfr.mkv", lambda t: gray_frame(10 + 6 * int(np.argmin(abs(times - t))), SIZE),
                    list(times), size=SIZE, audio_fn=lambda t: 0 * t)
    result = transcode(path, "vfr", "x", 0, OPTS)
    end = times[-1] + (times[-1] - times[-2])
    assert result["meta"]["num_frames"] == round(end * 30)
    got = np.array([f.mean() for f in frames_of(result)])
    assert len(got) == result["meta"]["num_frames"]
    # Output frame j shows the last source frame whose time, on the 30 fps grid, is <= j.
    slots = np.round(times * 30)
    expected = [10 + 6 * (np.searchsorted(slots, j, side="right") - 1) for j in range(len(got))]
    assert np.abs(got - expected).max() < 4  # lossy VP9 on flat frames


def test_the_last_frame_lasts_until_the_stream_says_it_ends(tmp_path):
    """Frames at 0..49 of 30 fps, then one at 2.0 s (ten dropped before it): the gap before the
    last frame would make it last 0.37 s (71 frames); the AVI stream declares its end at 2.033 s."""
    times = [i / 30 for i in range(50)] + [2.0]
    path = write_av(tmp_path / "drop.avi", lambda t: gray_frame(10 + 3 * round(t * 30), SIZE), times, size=SIZE,
                    audio_fn=lambda t: 0 * t)
    result = transcode(path, "drop", "x", 0, OPTS)
    assert result["meta"]["num_frames"] == 61
    got = [f.mean() for f in frames_of(result)]
    assert abs(got[-1] - (10 + 3 * 60)) < 4 and abs(got[-2] - (10 + 3 * 49)) < 4  # the last frame, and the one held


@pytest.mark.parametrize("suffix, tolerance_ms", [(".mkv", 2), (".mp4", 25)])
def test_audio_is_aligned_to_video_frame_zero(tmp_path, suffix, tolerance_ms):
    # White flashes in the picture and tone bursts in the sound at the same moments; the audio
    # track starts 0.3 s after the video, so the packer has to shift it.
    events = [0.5, 1.0, 1.6]
    flash = lambda t: any(e <= t < e + 0.1 for e in events)
    burst = lambda t: np.where(np.any([(e <= t) & (t < e + 0.1) for e in events], axis=0), np.sin(2 * np.pi * 1000 * t), 0)
    path = write_av(tmp_path / f"av{suffix}", lambda t: gray_frame(250 if flash(t) else 20, SIZE), [i / 30 for i in range(60)],
                    burst, audio_start=0.3, size=SIZE)
    result = transcode(path, "av", "x", 0, OPTS)
    bright = np.array([f.mean() > 128 for f in frames_of(result)])
    onsets_v = np.flatnonzero(bright[1:] & ~bright[:-1]) + 1
    assert list(onsets_v) == [round(e * 30) for e in events]
    audio = decode_track(result["members"]["flac"], result["members"]["info"]).astype(np.float32)
    assert len(audio) == result["meta"]["audio_samples"] == 60 * 800
    loud = np.convolve(np.abs(audio) > 3000, np.ones(48), "same") > 0
    onsets_a = np.flatnonzero(loud[1:] & ~loud[:-1]) + 1
    assert len(onsets_a) == 3
    assert np.abs(onsets_a / 24000 - np.array(events)).max() * 1000 < tolerance_ms
    assert not loud[: int(0.3 * 24000)].any()  # before the audio track started: silence, not shifted sound


def test_info_member_describes_the_segments(tmp_path):
    result = transcode(make_clip(tmp_path / "a.mp4", seconds=2.0), "a", "drums", 3, OPTS)
    meta, offsets = parse_info(result["members"]["info"])
    assert (meta["num_frames"], meta["seg_frames"], meta["num_segments"], meta["label_index"]) == (60, 10, 6, 3)
    assert (meta["width"], meta["height"]) == (86, 64)  # short side 64, even width
    assert offsets[0] == 0 and offsets[-1] == len(result["members"]["segs"])
    assert [len(decode_segment(s)) for s in split_segments(result["members"]["segs"], result["members"]["info"])] == [10] * 6


def test_audio_is_packed_in_segments_aligned_with_the_video_ones(tmp_path):
    """One complete FLAC file per video segment (10 frames at 30 fps: 8,000 samples at 24 kHz),
    the last one the rest, no header padding; together they are the track."""
    path = write_av(tmp_path / "a.mkv", lambda t: gray_frame(100, SIZE), [i / 30 for i in range(55)],
                    lambda t: 0.5 * np.sin(2 * np.pi * 440 * t), size=SIZE)
    members = transcode(path, "a", "x", 0, OPTS)["members"]
    meta, _ = parse_info(members["info"])
    pieces = split_audio(members["flac"], members["info"])
    assert len(pieces) == meta["num_segments"] == 6 and all(p[:4] == b"fLaC" for p in pieces)
    assert b"".join(pieces) == members["flac"]
    assert [len(decode_flac(p)) for p in pieces] == [8000] * 5 + [55 * 800 - 5 * 8000]
    track = decode_track(members["flac"], members["info"]).astype(float)
    assert len(track) == meta["audio_samples"] and np.abs(track).max() > 10000
    expected = 0.5 * 32767 * np.sin(2 * np.pi * 440 * np.arange(len(track)) / 24000)
    assert np.corrcoef(track[2000:], expected[2000:])[0, 1] > 0.99  # continuous across the segment seams
    silent = encode_flac(np.zeros(8000, np.int16), 24000)
    assert len(silent) < 400  # FFmpeg's muxer would reserve 8 KiB of padding in each


def corrupt_after(path, start, out):
    data = bytearray(path.read_bytes())
    data[start:] = np.random.default_rng(0).integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
    out.write_bytes(data)
    return out


def bad_inputs(tmp_path):
    good = make_clip(tmp_path / "good.mkv", seconds=2.0, value=lambda t: int(1000 * t) % 256)
    truncated = tmp_path / "truncated.mkv"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    audio_only = tmp_path / "audio_only.flac"
    audio_only.write_bytes(encode_flac(np.zeros(24000, np.int16), 24000))
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("this is not a video " * 50)
    return {
        "missing": (tmp_path / "missing.mp4", "open", "file not found"),
        "zero bytes": (tmp_path / "zero.mp4", "open", "empty file"),
        "not a video": (tmp_path / "text.mp4", "open", "not a readable media file"),
        "truncated": (truncated, "decode", "truncated"),
        "no video stream": (audio_only, "probe", "no video stream"),
        "undecodable": (corrupt_after(good, 2000, tmp_path / "garbage.mkv"), "decode", "decoded 0.0"),
        "shorter than one clip": (make_clip(tmp_path / "short.mp4", seconds=0.5), "length", "shorter than one clip"),
        "no audio stream": (make_clip(tmp_path / "silent.mp4", audio=False), "probe", "no audio stream"),
    }


def test_every_bad_input_gets_a_stage_and_a_reason(tmp_path):
    for kind, (path, stage, reason) in bad_inputs(tmp_path).items():
        with pytest.raises(PackError) as err:
            transcode(path, "k", "x", 0, OPTS)
        assert err.value.stage == stage and reason in err.value.reason, kind


def test_no_audio_packs_as_silence_when_allowed(tmp_path):
    opts = PackOptions(short_side=64, seg_frames=10, allow_no_audio=True)
    result = transcode(make_clip(tmp_path / "silent.mp4", audio=False), "s", "x", 0, opts)
    assert result["meta"]["has_audio"] == 0
    audio = decode_track(result["members"]["flac"], result["members"]["info"])
    assert len(audio) == 60 * 800 and not audio.any()


def damage_packets(path, kind, share=None, out=None):
    """Overwrite the payload of one packet of `kind` in the middle of the file (or of every
    packet with probability `share`) with random bytes, as a disk or a download does."""
    import av

    with av.open(str(path)) as c:  # keyframes are left whole: losing one loses its whole group of pictures
        packets = [(p.pos, p.size) for p in c.demux() if p.size > 64 and p.stream.type == kind and p.pos is not None
                   and not (kind == "video" and p.is_keyframe)]
    rng = np.random.default_rng(0)
    chosen = [packets[len(packets) // 2]] if share is None else [p for p in packets if rng.random() < share]
    data = bytearray(path.read_bytes())
    for pos, size in chosen:
        data[pos + 8:pos + size - 8] = rng.integers(0, 256, size - 16, dtype=np.uint8).tobytes()
    out = out or path.with_name(f"damaged_{kind}_{path.name}")
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".avi"])
@pytest.mark.parametrize("kind", ["video", "audio"])
def test_one_corrupt_packet_is_concealed_and_counted(tmp_path, suffix, kind):
    # A moving texture, so that frames between keyframes are packets worth damaging; 8 s, of
    # which 2% (160 ms) may be lost.
    texture = np.random.default_rng(1).integers(0, 256, (SIZE[1], SIZE[0] * 2, 3), dtype=np.uint8)
    path = write_av(tmp_path / f"clip{suffix}", lambda t: np.roll(texture, 3 * round(t * 30), axis=1)[:, :SIZE[0]],
                    [i / 30 for i in range(240)], lambda t: 0.3 * np.sin(2 * np.pi * 440 * t), size=SIZE)
    result = transcode(damage_packets(path, kind), "clip", "x", 0, OPTS)
    meta = result["meta"]
    assert meta["num_frames"] == 240 and len(frames_of(result)) == 240
    assert len(decode_track(result["members"]["flac"], result["members"]["info"])) == meta["audio_samples"]
    # H.264, AAC and FLAC report the packet, which is then concealed and counted; MPEG-4 Part 2
    # and AC3 may conceal the damage inside the decoder, with nothing to count.
    counted = meta["concealed_packets"]
    assert counted[kind] == 1 or (suffix == ".avi" and counted[kind] == 0)
    assert counted["audio" if kind == "video" else "video"] == 0
    assert 0 <= meta["concealed_seconds"] <= 0.11
    if kind == "audio" and counted["audio"]:  # the lost packet's span is silence, the rest stays in place
        assert 0.015 < meta["audio_gap_seconds"] <= 0.11


def test_many_corrupt_packets_fail_the_video_past_the_threshold(tmp_path):
    path = damage_packets(make_clip(tmp_path / "clip.mp4", seconds=3.0), "audio", share=0.3)
    with pytest.raises(PackError, match="audio packets do not decode: .* more than concealment is allowed"):
        transcode(path, "clip", "x", 0, OPTS)
    meta = transcode(path, "clip", "x", 0, PackOptions(short_side=64, seg_frames=10, max_lost_share=0.5))["meta"]
    assert meta["concealed_packets"]["audio"] >= 5


def test_audio_after_a_gap_in_its_timestamps_stays_with_its_picture(tmp_path):
    """MKV whose audio packets are absent from 4.0 to 4.5 s (later timestamps true): every click
    after the gap must still sound within one video frame of its flash."""
    import av

    path, rate, fps = tmp_path / "gap.mkv", 24000, 30
    clicks = np.arange(0.25, 6.0, 0.5)
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        aus = c.add_stream("flac", rate=rate, layout="mono")
        for i in range(6 * fps):
            flash = any(abs(i / fps - k) < 0.5 / fps for k in clicks)
            frame = av.VideoFrame.from_ndarray(gray_frame(240 if flash else 20, SIZE), format="rgb24")
            frame.pts = i
            c.mux(vs.encode(frame))
        c.mux(vs.encode())
        block = 1024
        t = np.arange(6 * rate) / rate
        signal = np.where(np.any([(k <= t) & (t < k + 0.02) for k in clicks], axis=0), 0.8 * np.sin(2 * np.pi * 1500 * t), 0)
        pcm = (signal * 32767).astype(np.int16)
        for start in range(0, len(pcm), block):
            if 4.0 * rate <= start < 4.5 * rate:
                continue  # these packets never reach the file
            frame = av.AudioFrame.from_ndarray(pcm[None, start:start + block], format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            c.mux(aus.encode(frame))
        c.mux(aus.encode())
    result = transcode(path, "gap", "x", 0, OPTS)
    audio = decode_track(result["members"]["flac"], result["members"]["info"]).astype(np.float32)
    loud = np.convolve(np.abs(audio) > 8000, np.ones(48), "same") > 0
    onsets = np.flatnonzero(loud[1:] & ~loud[:-1]) + 1
    heard = [k for k in clicks if not 4.0 <= k < 4.5]
    assert len(onsets) == len(heard)
    assert np.abs(onsets / rate - np.array(heard)).max() < 1 / fps
    assert 0.45 < result["meta"]["audio_gap_seconds"] < 0.55
