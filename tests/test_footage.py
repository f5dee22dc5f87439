"""The camera-footage content set for the loader benchmarks: windows of the sources, looped,
mirrored every other copy, each with sound."""
import av
import numpy as np

from stica.tools.footage import main as footage_main
from stica.tools.footage import make_footage
from stica.tools.synth import tone, uniform_times, write_av


def half_bright(t):
    """Left half dark, right half bright: a mirrored copy shows it the other way round."""
    img = np.full((64, 96, 3), 30, np.uint8)
    img[:, 48:] = 220
    return img


def test_copies_are_windows_of_8_to_12_s_with_sound_and_every_other_one_mirrored(tmp_path):
    (tmp_path / "src").mkdir()
    loud = write_av(tmp_path / "src" / "loud.mkv", half_bright, uniform_times(3.0, 25), tone(440), size=(96, 64))
    silent = write_av(tmp_path / "src" / "silent.mkv", half_bright, uniform_times(2.0, 25), size=(96, 64))
    copies = make_footage([loud, silent], tmp_path / "out", count=4, seed=1)
    assert [p.parent.name for p in copies] == ["loud", "loud", "silent", "silent"]
    for path in copies:
        index = int(path.stem.rsplit("_", 1)[1])
        with av.open(str(path)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        with av.open(str(path)) as c:
            sound = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
            rate = c.streams.audio[0].rate
        assert 8 * 25 <= len(frames) <= 12 * 25 + 1  # longer than the 2-3 s sources: they loop
        assert 8 <= len(sound) / rate <= 12.2 and np.abs(sound).max() > 0.01
        left, right = frames[len(frames) // 2][:, :40].mean(), frames[len(frames) // 2][:, 56:].mean()
        mirrored = index % 2 == 1
        assert (left > right + 100) if mirrored else (right > left + 100), path
    with av.open(str(copies[0])) as c:
        rate = c.streams.audio[0].rate
        wave = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    spectrum = np.abs(np.fft.rfft(wave[rate:2 * rate]))  # one second: bin k is k Hz
    assert abs(int(np.argmax(spectrum)) - 440) <= 2  # the source's own sound, not the noise floor


def test_missing_sources_are_an_error_naming_what_was_looked_for(tmp_path, capsys):
    assert footage_main([str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "bikes.mp4" in capsys.readouterr().err
