"""Transcoding one input: constant frame rate, audio alignment, every bad-input reason."""
import numpy as np
import pytest

from stica.shards import parse_info, split_segments
from stica.tools.synth import gray_frame, write_av
from stica.media import decode_flac, decode_segment
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
    audio = decode_flac(result["members"]["flac"]).astype(np.float32)
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
    audio = decode_flac(result["members"]["flac"])
    assert len(audio) == 60 * 800 and not audio.any()
