"""The demo: its corpus carries the class in both picture and sound, its statistics say what they
claim, and a small end-to-end run writes demo.json and demo.png."""
import json

import av
import numpy as np
import pytest

from stica.tools.demo import FPS, REGISTERS, SHAPES, SIZES, SPREAD, chance_levels, main as demo_main, make_video, summarise


def decode(path):
    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(float)
    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
        rate = c.streams.audio[0].rate
    return frames, audio, rate


def landings_from_sound(audio, rate) -> np.ndarray:
    """Times (s) at which the voice swells: its 25-ms loudness rises through mid-range (a rise
    within 0.1 s of the last one is the same swell)."""
    win = rate // 40
    loudness = np.sqrt(np.convolve(audio ** 2, np.ones(win) / win, mode="same"))
    above = loudness > (np.percentile(loudness, 5) + loudness.max()) / 2
    rises = np.flatnonzero(above[1:] & ~above[:-1]) / rate
    return np.array([t for i, t in enumerate(rises) if i == 0 or t - rises[i - 1] > 0.1])


def peak_frequency(audio, rate) -> float:
    return np.fft.rfftfreq(len(audio), 1 / rate)[np.abs(np.fft.rfft(audio)).argmax()]


@pytest.mark.parametrize("shape", SHAPES)
def test_the_sound_sings_in_the_register_of_the_class(tmp_path, shape):
    make_video(tmp_path / "v.mp4", shape, np.random.default_rng(7))
    _, audio, rate = decode(tmp_path / "v.mp4")
    peak = peak_frequency(audio, rate)
    assert REGISTERS[shape] * 2 ** -(SPREAD + 0.01) < peak < REGISTERS[shape] * 2 ** (SPREAD + 0.01)  # the size moves it


def test_a_bigger_shape_sings_lower(tmp_path):
    """Within a class, the pitch tells the size: the instance cue that audio-visual retrieval
    at R@1 needs beyond the class."""
    peaks, sizes = [], []
    for seed in range(6):
        sizes.append(np.random.default_rng(seed).uniform(*SIZES))  # make_video's first draw
        make_video(tmp_path / f"{seed}.mp4", "stick", np.random.default_rng(seed))
        _, audio, rate = decode(tmp_path / f"{seed}.mp4")
        peaks.append(peak_frequency(audio, rate))
    order = np.argsort(sizes)
    assert np.ptp(sizes) > 0.4 * (SIZES[1] - SIZES[0])
    assert np.all(np.diff(np.array(peaks)[order]) < 0)


def test_the_sound_swells_when_the_shape_lands(tmp_path):
    """The shape is fastest where it lands (a bounce) and slowest at the top: the picture moves
    most at the frames where the sound swells, although the background and the gliding cross
    move at every frame alike."""
    make_video(tmp_path / "v.mp4", "disc", np.random.default_rng(3))
    frames, audio, rate = decode(tmp_path / "v.mp4")
    landings = landings_from_sound(audio, rate)
    gaps = np.diff(landings)
    assert len(gaps) >= 3 and gaps.std() < 0.05 * gaps.mean()  # a steady beat
    motion = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))  # motion[i]: frame i to i + 1
    at_landing = [motion[int(t * FPS) - 1: int(t * FPS) + 1].max() for t in landings if 1 <= t * FPS < len(motion) - 1]
    at_top = [motion[int((a + b) / 2 * FPS)] for a, b in zip(landings, landings[1:])]
    assert np.mean(at_landing) > 1.5 * np.mean(at_top)


def test_intervals_and_verdicts():
    n = 200
    rng = np.random.default_rng(0)
    good, bad = (rng.uniform(size=n) < 0.8).astype(float), (rng.uniform(size=n) < 0.3).astype(float)
    same = (rng.uniform(size=n) < 0.3).astype(float)
    chance = {"m": 0.25}
    better = summarise({"m": good}, {"m": bad}, chance)[0]
    assert better["verdict"] == "better" and better["trained"] == good.mean()
    lo, hi = better["trained_ci"]
    half = 1.96 * np.sqrt(0.8 * 0.2 / n)  # the normal approximation the bootstrap should agree with
    assert lo < good.mean() < hi and abs((hi - lo) / 2 - half) < 0.25 * half
    assert summarise({"m": bad}, {"m": good}, chance)[0]["verdict"] == "worse"
    assert summarise({"m": bad}, {"m": same}, chance)[0]["verdict"] == "not distinguishable"


def test_chance_levels():
    train = np.array([0] * 6 + [1] * 2 + [2] * 2 + [3] * 0)
    test = np.array([0, 1, 2, 3])
    chance = chance_levels(train, test, classes=4)
    assert chance["class retrieval R@1"] == pytest.approx((0.6 + 0.2 + 0.2 + 0.0) / 4)
    assert chance["audio->video R@1"] == 0.25 and chance["audio->video R@5"] == 1.0
    assert chance["linear probe top-1"] == 0.25


def test_a_small_demo_writes_its_table_json_and_plot(tmp_path, capsys):
    assert demo_main(["--out", str(tmp_path), "--train-videos", "16", "--val-videos", "8", "--test-videos", "12",
                      "--epochs", "1", "data.batch_size=4", "train.log_every=1", "eval.linear.iterations=5"]) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    names = [m["name"] for m in result["metrics"]]
    assert names == ["audio->video R@1", "audio->video R@5", "video->audio R@1", "video->audio R@5",
                     "class retrieval R@1", "linear probe top-1"]
    for m in result["metrics"]:
        assert set(m) == {"name", "trained", "trained_ci", "init", "init_ci", "chance", "verdict"}
        assert m["trained_ci"][0] <= m["trained"] <= m["trained_ci"][1] and m["verdict"] in (
            "better", "not distinguishable", "worse")
    assert result["metrics"][0]["chance"] == pytest.approx(1 / 12)
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "linear probe top-1" in capsys.readouterr().out


def test_recorded_results_render_into_their_marked_blocks(tmp_path):
    from stica.tools.demo import render, score_table, seeds_table

    metric = {"name": "audio->video R@1", "trained": 0.0625, "trained_ci": [0.03125, 0.099], "init": 0.005,
              "init_ci": [0.0, 0.016], "chance": 0.0052, "verdict": "better"}
    result = {"metrics": [metric], "seed": 0, "stage_seconds": {"corpus": 20.4, "training": 250.2},
              "total_seconds": 301.0, "date": "2026-12-07", "commit": "abc1234", "machine": "2 cores of X"}
    table = score_table(result)
    assert "| audio->video R@1 | 0.062 (0.031-0.099) | 0.005 (0.000-0.016) | 0.005 | better |" in table
    assert table.endswith("2026-12-07, abc1234, 2 cores of X: 301 s in all (corpus 20 s, training 250 s).")
    page = "intro\n<!-- demo:scores -->\nstale\n<!-- /demo:scores -->\nafter\n"
    assert render(page, {"scores": table}) == f"intro\n<!-- demo:scores -->\n{table}\n<!-- /demo:scores -->\nafter\n"
    assert render(render(page, {"scores": table}), {"scores": table}) == render(page, {"scores": table})
    seeds = seeds_table([{**result, "seed": 1, "metrics": [metric, {**metric, "name": "video->audio R@1"},
                                                            {**metric, "name": "audio->video R@5"},
                                                            {**metric, "name": "class retrieval R@1"},
                                                            {**metric, "name": "linear probe top-1",
                                                             "verdict": "worse"}]}])
    assert "| 1 | 4 of 5 | 0.062 | 0.062 | 0.062 | 0.062 (0.031-0.099) | 0.062 (0.031-0.099) | 301 s |" in seeds


def test_record_refuses_a_demo_other_than_the_shipped_one(tmp_path):
    with pytest.raises(SystemExit, match="--record stores the demo as shipped"):
        demo_main(["--out", str(tmp_path), "--record", "--epochs", "1"])
