"""The packing job end to end: inputs, shards, failures, resume, determinism, verify, readers."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import webdataset as wds

from stica.media import decode_segment
from stica.shards import INFO_OFFSETS, load_manifest, parse_info, shard_paths, split_segments
from stica.tools.shard import main as shard_main

from conftest import make_clip

PACK = ["--short-side", "64", "--seg-frames", "10", "--shard-samples", "2"]


def pack(root, out, *extra, workers=2):
    return shard_main(["pack", "--root", str(root), "--out", str(out), "--workers", str(workers), *PACK, *extra])


def test_class_tree_packs_good_videos_and_reports_every_bad_one(class_tree, tmp_path, capsys):
    out = tmp_path / "shards"
    assert pack(class_tree, out) == 1  # something failed: the exit status says so
    assert "packed 6 videos (train: 6); failed 4" in capsys.readouterr().out
    manifest = load_manifest(out)
    assert manifest["classes"] == ["drums", "flute"]
    assert (out / "classes.txt").read_text() == "drums\nflute\n"
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [2, 2, 2]
    failures = {json.loads(l)["key"]: json.loads(l) for l in (out / "failures.jsonl").read_text().splitlines()}
    assert {k: f["stage"] for k, f in failures.items()} == {
        "empty": "open", "notes": "open", "short": "length", "silent": "probe"}
    assert all(f["path"].startswith(str(class_tree)) and f["reason"] for f in failures.values())
    tars, idxs = shard_paths(out, "train")
    assert all(os.path.exists(i) for i in idxs)
    # The webdataset library reads the shards as plain tar samples.
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == [f"{c}{i}" for c in ("drums", "flute") for i in range(3)]
    for s in samples:
        meta = json.loads(s["json"])
        assert int(s["cls"]) == meta["label_index"] == manifest["classes"].index(meta["label"])
        frames = [f for seg in split_segments(s["segs"], s["info"]) for f in decode_segment(seg)]
        assert len(frames) == meta["num_frames"] == parse_info(s["info"])[0]["num_frames"]


def test_kinetics_csv_with_splits_and_missing_videos(tmp_path):
    root = tmp_path / "k400"
    rows = ["label,youtube_id,time_start,time_end,split"]
    for i, (label, split) in enumerate([("abseiling", "train"), ("abseiling", "val"), ("zumba", "train"),
                                        ("zumba", "train"), ("zumba", "val")]):
        yid = f"vid-{i}_x"
        rows.append(f"{label},{yid},{10 * i},{10 * i + 10},{split}")
        if i != 3:  # one listed video was never downloaded
            (root / label).mkdir(parents=True, exist_ok=True)
            make_clip(root / label / f"{yid}_{10 * i:06d}_{10 * i + 10:06d}.mp4", seconds=1.2)
    (tmp_path / "k.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "shards"
    assert pack(root, out, "--csv", str(tmp_path / "k.csv")) == 1
    manifest = load_manifest(out)
    assert {k: v["samples"] for k, v in manifest["splits"].items()} == {"train": 2, "val": 2}
    assert [s["name"] for s in manifest["splits"]["val"]["shards"]] == ["val-000000.tar"]
    (failure,) = [json.loads(l) for l in (out / "failures.jsonl").read_text().splitlines()]
    assert failure["key"] == "vid-3_x_000030_000040" and failure["reason"] == "file not found"
    keys = {s["__key__"] for s in wds.WebDataset(shard_paths(out, "val")[0], shardshuffle=False)}
    assert keys == {"vid-1_x_000010_000020", "vid-4_x_000040_000050"}


def shard_digests(out):
    return {s["name"]: s["sha256"] for split in load_manifest(out)["splits"].values() for s in split["shards"]}


def test_same_inputs_and_seed_give_identical_shards_and_the_seed_shuffles(class_tree, tmp_path):
    pack(class_tree, tmp_path / "a", workers=2)
    pack(class_tree, tmp_path / "b", workers=1)
    pack(class_tree, tmp_path / "c", "--seed", "7")
    a, b = shard_digests(tmp_path / "a"), shard_digests(tmp_path / "b")
    assert a == b
    for name in a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    order = lambda out: [s["__key__"] for s in wds.WebDataset(shard_paths(out, "train")[0], shardshuffle=False)]
    assert order(tmp_path / "a") != order(tmp_path / "c")
    assert sorted(order(tmp_path / "a")) == sorted(order(tmp_path / "c"))


def test_killed_run_resumes_without_redoing_losing_or_duplicating(class_tree, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "stica.tools.shard", "pack", "--root", str(class_tree), "--out", str(out),
           "--workers", "1", *PACK]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    partial = out / "train-000001.tar.tmp"
    deadline = time.time() + 60
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists(), "the run should have been killed while writing its second shard"
    journal = (out / "_journal-train.jsonl").read_text().splitlines()
    assert len(journal) == 1 and not (out / "train-000001.tar").exists()
    first = (out / "train-000000.tar").stat().st_mtime_ns

    assert pack(class_tree, out, workers=1) == 1
    assert (out / "train-000000.tar").stat().st_mtime_ns == first  # the finished shard was not redone
    assert not list(out.glob("*.tmp"))
    pack(class_tree, tmp_path / "whole", workers=1)
    assert shard_digests(out) == shard_digests(tmp_path / "whole")
    assert (out / "failures.jsonl").read_text() == (tmp_path / "whole" / "failures.jsonl").read_text()


def test_verify_passes_clean_shards_and_catches_a_corrupted_one(class_tree, tmp_path, capsys):
    out = tmp_path / "shards"
    pack(class_tree, out)
    assert shard_main(["verify", str(out)]) == 0
    tar = out / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[1500:1600] = bytes(100)  # inside the first member's payload
    tar.write_bytes(data)
    assert shard_main(["verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert "train-000001.tar: sha256 differs" in report


def test_dali_cpu_reader_decodes_a_segment_from_the_shards(class_tree, tmp_path):
    from nvidia.dali import fn, pipeline_def, types

    out = tmp_path / "shards"
    pack(class_tree, out)
    tars, idxs = shard_paths(out, "train")

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        segs, info = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["segs", "info"],
                                           dtypes=[types.UINT8, types.INT32])
        k = fn.reshape(fn.constant(idata=[1], dtype=types.INT32), shape=[])  # the second segment
        start, end = info[INFO_OFFSETS + k], info[INFO_OFFSETS + 1 + k]
        seg = fn.slice(segs, fn.reshape(start, shape=[1]), fn.reshape(end - start, shape=[1]), axes=[0])
        return fn.decoders.video(seg, device="cpu"), segs, info

    p = pipe()
    p.build()
    for _ in range(3):
        clips, segs, info = p.run()
        for i in range(2):
            expected = decode_segment(split_segments(np.asarray(segs.at(i)).tobytes(), np.asarray(info.at(i)))[1])
            # DALI's and swscale's YUV->RGB conversions round differently by one level.
            np.testing.assert_allclose(np.asarray(clips.at(i)), np.stack(expected), atol=2)


def test_crash_edges_a_cut_journal_line_an_unjournaled_shard_and_changed_options(class_tree, tmp_path):
    out = tmp_path / "edges"
    pack(class_tree, out)
    whole = shard_digests(out)
    journal = out / "_journal-train.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    last_shard = json.loads(lines[-1])["name"] if json.loads(lines[-1])["shard"] is not None else None
    assert len(lines) >= 2 and last_shard

    # A crash while appending the last record: half a line. It is dropped and its shard redone.
    journal.write_text("".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])
    before = (out / last_shard).stat().st_mtime_ns
    pack(class_tree, out)
    assert journal.read_text() == "".join(lines) and shard_digests(out) == whole
    assert (out / last_shard).stat().st_mtime_ns != before  # rewritten, to the same bytes

    # A crash after the rename but before the journal line: the tar is there, unrecorded.
    journal.write_text("".join(lines[:-1]))
    (out / last_shard.replace(".tar", ".idx")).unlink()
    pack(class_tree, out)
    assert journal.read_text() == "".join(lines) and shard_digests(out) == whole
    assert (out / last_shard.replace(".tar", ".idx")).exists()

    # Other options in the same --out: refused, nothing touched.
    with pytest.raises(SystemExit, match="holds a packing job with other inputs or options"):
        shard_main(["pack", "--root", str(class_tree), "--out", str(out), "--short-side", "96", "--seg-frames", "10",
                    "--shard-samples", "2"])
    assert journal.read_text() == "".join(lines) and shard_digests(out) == whole


def test_awkward_file_names_become_keys_dali_reads(tmp_path):
    """Long, unicode, dotted, spaced and dash-leading names: every shard still reads through
    DALI (verify), keys stay unique and the original names stay in each sample's JSON."""
    root = tmp_path / "videos" / "cls"
    root.mkdir(parents=True)
    names = ["x" * 180, "vidéo_日本語", "a.b.c", "my video", "-dash", "plain_name", "日本語", "中国語"]
    for i, name in enumerate(names):
        make_clip(root / f"{name}.mp4", seconds=1.0, freq=300.0 + 50 * i)
    out = tmp_path / "shards"
    assert pack(tmp_path / "videos", out) == 0
    assert shard_main(["verify", str(out)]) == 0  # DALI's reader reads every shard
    keys = {}
    for tar in sorted(out.glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            meta = json.loads(sample["json"])
            keys[meta["key"]] = meta["source"]
    assert sorted(keys.values()) == sorted(f"{n}.mp4" for n in names)  # unique keys, nothing lost
    assert "plain_name" in keys  # a name that is already a key stays as it is
    for key in keys:
        assert len(key) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)


def test_concealed_packets_are_listed_in_the_manifest(tmp_path, capsys):
    from test_transcode import damage_packets

    root = tmp_path / "videos" / "cls"
    root.mkdir(parents=True)
    make_clip(root / "good.mp4", seconds=2.0)
    clip = make_clip(tmp_path / "clip.mp4", seconds=8.0)
    damage_packets(clip, "audio", out=root / "damaged.mp4")
    out = tmp_path / "shards"
    assert pack(tmp_path / "videos", out) == 0
    (entry,) = load_manifest(out)["splits"]["train"]["concealed"]
    assert entry["key"] == "damaged" and entry["packets"] == {"video": 0, "audio": 1} and entry["seconds"] > 0
    assert "1 video(s) packed with corrupt packets concealed" in capsys.readouterr().out


def test_packing_in_parts_then_merging_equals_one_machine(class_tree, tmp_path, capsys):
    out = tmp_path / "parts"
    pack(class_tree, out, "--part", "0/2")
    with pytest.raises(SystemExit, match="part.s. 1/2 not complete"):
        shard_main(["merge", str(out)])
    pack(class_tree, out, "--part", "1/2")
    assert shard_main(["merge", str(out)]) == 1  # the tree's bad inputs: failures, as in one run
    assert shard_main(["verify", str(out)]) == 0
    pack(class_tree, tmp_path / "one")

    def samples(root):
        return sorted(json.loads(s["json"])["key"] for tar in sorted(root.glob("*.tar"))
                      for s in wds.WebDataset(str(tar), shardshuffle=False))

    assert samples(out) == samples(tmp_path / "one") and len(samples(out)) == 6
    failures = lambda root: sorted((root / "failures.jsonl").read_text().splitlines())
    assert failures(out) == failures(tmp_path / "one") and len(failures(out)) == 4
    names = [s["name"] for s in load_manifest(out)["splits"]["train"]["shards"]]
    assert {n.split("-")[1] for n in names} == {"p000", "p001"}
    with pytest.raises(SystemExit, match="other inputs or options"):  # a part packed with other options
        pack(class_tree, out, "--part", "1/2", "--fps", "25")
