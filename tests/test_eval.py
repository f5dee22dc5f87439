"""Downstream evaluation: UCF-101 / HMDB-51 layouts and split files, recall@k, the tasks end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from stica.config import load_config
from stica.eval import finetune_lr_factor, recall_at_k, topk_accuracy
from stica.eval import main as eval_main
from stica.shards import load_manifest
from stica.tools.demo import SHAPES, make_video
from stica.tools.shard import main as shard_main
from stica.tools.sources import from_hmdb51, from_ucf101

TINY = ["model.width=0.125", "data.crop_size=32", "data.num_frames=16", "data.batch_size=4", "data.workers=0",
        "data.eval_clips=2", "data.loader=reference", "data.device=cpu", "eval.num_classes=4", "eval.folds=[1]",
        "model.transformer.layers=1", "model.transformer.ffn=64", "eval.linear.iterations=20"]


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    """A UCF-101-style tree: 4 classes x 6 clips, split 1 lists 4 train + 2 test per class, and one
    listed test video that is not on disk."""
    root = tmp_path_factory.mktemp("ucf")
    rng = np.random.default_rng(0)
    train, test = [], []
    for c, shape in enumerate(SHAPES):
        cls = shape.capitalize()
        (root / "UCF-101" / cls).mkdir(parents=True)
        for g in range(6):
            name = f"{cls}/v_{cls}_g{g + 1:02d}_c01.avi"
            make_video(root / "UCF-101" / name.replace(".avi", ".mp4"), shape, rng)
            (root / "UCF-101" / name.replace(".avi", ".mp4")).rename(root / "UCF-101" / name)
            (train if g < 4 else test).append(name)
    test.append("Disc/v_Disc_g99_c01.avi")
    (root / "splits").mkdir()
    (root / "splits" / "trainlist01.txt").write_text("".join(f"{n} {SHAPES.index(n.split('/')[0].lower()) + 1}\n"
                                                             for n in train))
    (root / "splits" / "testlist01.txt").write_text("".join(f"{n}\n" for n in test))
    return root


def test_ucf_split_files_and_held_out_validation(ucf):
    sources = from_ucf101(ucf / "UCF-101", ucf / "splits", folds=[1], val_share=0.25)
    by_split = {s: sorted(x.key for x in sources if x.split == s) for s in ("fold1-train", "fold1-val", "fold1-test")}
    assert [len(v) for v in by_split.values()] == [12, 4, 9]  # 1 of 4 per class held out; 8 + 1 missing test
    assert {s.label for s in sources if s.split == "fold1-val"} == {shape.capitalize() for shape in SHAPES}
    assert not set(by_split["fold1-val"]) & set(by_split["fold1-train"])
    assert sources == from_ucf101(ucf / "UCF-101", ucf / "splits", folds=[1], val_share=0.25)  # deterministic


def test_hmdb_split_files(tmp_path):
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "brush_hair_test_split1.txt").write_text("a.avi 1\nb.avi 2\nc.avi 0\nd.avi 1\n")
    (tmp_path / "splits" / "cartwheel_test_split1.txt").write_text("e.avi 1\nf.avi 2\n")
    sources = from_hmdb51(tmp_path / "videos", tmp_path / "splits", folds=[1], val_share=0.0)
    assert sorted((s.key, s.label, s.split) for s in sources) == [
        ("a", "brush_hair", "fold1-train"), ("b", "brush_hair", "fold1-test"), ("d", "brush_hair", "fold1-train"),
        ("e", "cartwheel", "fold1-train"), ("f", "cartwheel", "fold1-test")]
    assert {s.key: s.path for s in sources}["a"] == str(tmp_path / "videos" / "brush_hair" / "a.avi")
    with pytest.raises(FileNotFoundError, match="split2"):
        from_hmdb51(tmp_path / "videos", tmp_path / "splits", folds=[2])


def test_recall_at_k_against_a_hand_computed_case():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    gallery_labels = torch.tensor([0, 1, 2, 0])
    queries = torch.tensor([[0.9, 0.1], [0.1, 0.9], [-0.9, -0.2]])
    query_labels = torch.tensor([1, 1, 0])
    # Nearest first: q0 -> [0, 2, 1, 3] (class 1 at rank 3); q1 -> [1, 2, 0, 3] (rank 1); q2 -> [3, ...] (rank 1).
    r = recall_at_k(queries, query_labels, gallery, gallery_labels, ks=(1, 2, 3))
    assert r == {"R@1": pytest.approx(2 / 3), "R@2": pytest.approx(2 / 3), "R@3": pytest.approx(1.0)}


@pytest.fixture(scope="module")
def ucf_shards(ucf, tmp_path_factory):
    shards = tmp_path_factory.mktemp("ucf-shards") / "shards"
    status = shard_main(["pack", "--root", str(ucf / "UCF-101"), "--ucf101-splits", str(ucf / "splits"),
                         "--folds", "1", "--val-share", "0.25", "--out", str(shards), "--short-side", "64"])
    return shards, status


def test_pack_ucf_then_retrieval_linear_probe_and_finetune(ucf_shards, tmp_path, capsys):
    shards, status = ucf_shards
    assert status == 1  # the missing test video
    (missing,) = [json.loads(l) for l in (shards / "failures.jsonl").read_text().splitlines()]
    assert missing["key"] == "v_Disc_g99_c01" and missing["split"] == "fold1-test" and missing["stage"] == "open"
    assert {k: v["samples"] for k, v in load_manifest(shards)["splits"].items()} == {
        "fold1-test": 8, "fold1-train": 12, "fold1-val": 4}

    common = ["--config", "configs/eval_ucf101.yaml", f"data.shards={shards}", f"eval.out={tmp_path / 'out'}", *TINY]
    retrieval = eval_main(["retrieval", *common])
    assert set(retrieval["fold1"]) == {"R@1", "R@5", "queries", "gallery"} and 0 <= retrieval["fold1"]["R@1"] <= 1
    assert (retrieval["fold1"]["queries"], retrieval["fold1"]["gallery"]) == (8, 12)  # 4 of 16 held out
    probe = eval_main(["linear", *common])
    assert 0 <= probe["fold1"]["top1"] <= probe["fold1"]["top5"] <= 1
    assert probe["fold1"]["weight_decay"] in (1e-4, 1e-3, 1e-2)
    tuned = eval_main(["finetune", *common, "eval.finetune.epochs=2", "eval.finetune.clips_per_video=1",
                       "eval.finetune.batch_size=4", "eval.finetune.warmup_epochs=1"])
    assert tuned["fold1"]["epoch"] in (1, 2) and 0 <= tuned["fold1"]["top1"] <= 1
    out = capsys.readouterr().out
    assert "finetune fold 1 epoch 2/2" in out and "val top1" in out
    assert json.loads((tmp_path / "out" / "finetune.json").read_text()) == json.loads(json.dumps(tuned))
    assert "| fold1 |" in (tmp_path / "out" / "retrieval.md").read_text()


def test_finetune_batch_is_global_so_two_processes_take_the_steps_of_one(ucf_shards, tmp_path):
    shards, _ = ucf_shards
    args = ["finetune", "--config", "configs/eval_ucf101.yaml", f"data.shards={shards}", *TINY,
            "eval.finetune.epochs=1", "eval.finetune.clips_per_video=1", "eval.finetune.batch_size=4",
            "eval.finetune.warmup_epochs=1"]
    one = eval_main([*args, f"eval.out={tmp_path / 'one'}"])["fold1"]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "stica.eval", *args, f"eval.out={tmp_path / 'two'}"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "finetune.json").read_text())["fold1"]
    # 12 training videos at a global batch of 4: 3 steps, whether 1 process takes 4 clips or 2 take 2 each.
    assert one["steps"] == two["steps"] == 3 and one["global_batch"] == two["global_batch"] == 4
    bad = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "stica.eval", *args[:-2], "eval.finetune.batch_size=3", f"eval.out={tmp_path / 'bad'}"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert bad.returncode != 0 and "must split evenly over 2 processes" in bad.stderr


def test_topk_accuracy_and_instance_retrieval_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5], [0.6, 0.5, 0.4]])
    labels = torch.tensor([1, 2, 0, 2])
    # Ranked classes: [1,0,2], [0,2,1], [2,1,0], [0,1,2]: hits at rank 1 for video 0 only; within 2 for 0 and 1.
    assert topk_accuracy(logits, labels, ks=(1, 2, 3)) == {"top1": 0.25, "top2": 0.5, "top3": 1.0}
    emb = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    ids = torch.arange(6)
    assert recall_at_k(emb, ids, emb, ids, ks=(1,)) == {"R@1": 1.0}  # identical embeddings find themselves


def test_finetune_learning_rate_factors_follow_the_schedule():
    f = load_config("configs/eval_ucf101.yaml").eval.finetune  # x8 warm-up over 2 epochs, x0.05 at 6 and 10
    factors = [finetune_lr_factor(e, f) for e in (0, 1, 2, 5.99, 6, 10, 11.9)]
    assert factors == pytest.approx([1.0, 4.5, 8.0, 8.0, 0.4, 0.02, 0.02])
    assert [round(f.lr_head * x, 6) for x in (8.0, 0.4, 0.02)] == [0.02, 0.001, 0.00005]


def test_pretraining_warm_up_then_cosine():
    from stica.train import learning_rate

    # 10 warm-up epochs of 100 from 1/64 of the peak, then constant (as released) or cosine.
    assert learning_rate(5000, load_config("configs/pretrain_kinetics.yaml").optim, 0.64, 100) == 0.64
    optim = load_config("configs/pretrain_kinetics.yaml", ["optim.schedule=cosine"]).optim
    peak, spe = 0.64, 100
    assert learning_rate(0, optim, peak, spe) == pytest.approx(0.01)  # the released warm-up's start
    assert learning_rate(500, optim, peak, spe) == pytest.approx(0.01 + (0.64 - 0.01) / 2)
    assert learning_rate(1000, optim, peak, spe) == pytest.approx(0.64)  # peak at the end of warm-up
    assert learning_rate(1000 + 4500, optim, peak, spe) == pytest.approx(0.32)  # half-way down the cosine
    assert learning_rate(10_000, optim, peak, spe) == pytest.approx(0.0, abs=1e-12)


def test_paper_protocol_trains_on_the_whole_list_takes_the_last_epoch_and_retrieves_on_split_1(ucf_shards, tmp_path):
    shards, _ = ucf_shards
    common = ["--config", "configs/eval_ucf101.yaml", f"data.shards={shards}", f"eval.out={tmp_path}", *TINY,
              "eval.protocol=paper", "eval.folds=[1,2]"]  # no fold 2 was packed: paper retrieval reads split 1 only
    retrieval = eval_main(["retrieval", *common])
    assert list(retrieval) == ["fold1", "mean"] and retrieval["fold1"]["gallery"] == 16  # train + held-out part
    probe = eval_main(["linear", *common[:-1], "eval.folds=[1]"])
    assert probe["fold1"]["weight_decay"] == 1e-4 and probe["fold1"]["val_top1"] is None
    tuned = eval_main(["finetune", *common[:-1], "eval.folds=[1]", "eval.finetune.epochs=2",
                       "eval.finetune.clips_per_video=1", "eval.finetune.batch_size=4", "eval.finetune.warmup_epochs=1"])
    assert (tuned["fold1"]["epoch"], tuned["fold1"]["steps"], tuned["fold1"]["val_top1"]) == (2, 8, None)
    with pytest.raises(SystemExit, match="eval.protocol='best'"):
        eval_main(["retrieval", *common[:-2], "eval.protocol=best"])


def test_split_files_keep_silent_videos_and_transcode_a_video_once_for_all_its_folds(tmp_path, capsys):
    """Three folds list every video (train in two, test in one): each is transcoded once (in a
    worker process, which reports whether the cache served it), and the silent half of the set
    is packed (has_audio 0), as UCF-101's video-only videos must be."""
    root, rng = tmp_path / "UCF-101", np.random.default_rng(1)
    names = []
    for c, shape in enumerate(SHAPES[:2]):
        cls = shape.capitalize()
        (root / cls).mkdir(parents=True)
        for g in range(3):
            name = f"{cls}/v_{cls}_g{g + 1:02d}_c01.avi"
            make_video(root / name.replace(".avi", ".mp4"), shape, rng, audio=g % 2 == 0)
            (root / name.replace(".avi", ".mp4")).rename(root / name)
            names.append(name)
    (tmp_path / "splits").mkdir()
    for fold in (1, 2, 3):  # fold f tests group f, trains on the others
        test = [n for n in names if f"_g{fold:02d}_" in n]
        (tmp_path / "splits" / f"trainlist0{fold}.txt").write_text(
            "".join(f"{n} {SHAPES.index(n.split('/')[0].lower()) + 1}\n" for n in names if n not in test))
        (tmp_path / "splits" / f"testlist0{fold}.txt").write_text("".join(f"{n}\n" for n in test))
    out = tmp_path / "shards"
    assert shard_main(["pack", "--root", str(root), "--ucf101-splits", str(tmp_path / "splits"), "--folds", "1,2,3",
                       "--val-share", "0", "--out", str(out), "--short-side", "64", "--workers", "1"]) == 0
    assert "transcoded 6 videos for 18 split entries" in capsys.readouterr().out  # 6 videos in 6 splits
    splits = load_manifest(out)["splits"]
    assert {k: v["samples"] for k, v in splits.items()} == {
        "fold1-train": 4, "fold1-test": 2, "fold2-train": 4, "fold2-test": 2, "fold3-train": 4, "fold3-test": 2}
    assert not (out / "_transcoded").exists()
    assert shard_main(["verify", str(out)]) == 0


def write_wav(path, signal, rate=44100):
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes())


SOUNDS = {  # three classes a random audio trunk can tell apart: pitch and rhythm differ
    "dog": lambda t: 0.5 * np.sin(2 * np.pi * 300 * t) * (np.sin(2 * np.pi * 3 * t) > 0),
    "rain": lambda t: 0.2 * np.random.default_rng(int(t[0] * 1e6) % 2**31).standard_normal(len(t)),
    "siren": lambda t: 0.5 * np.sin(2 * np.pi * (900 + 300 * np.sin(2 * np.pi * 0.5 * t)) * t),
}


def test_audio_linear_probe_on_esc50_and_dcase2014_layouts(tmp_path):
    esc = tmp_path / "ESC-50"
    (esc / "audio").mkdir(parents=True)
    (esc / "meta").mkdir()
    rows, rng = ["filename,fold,target,category,esc10,src_file,take"], np.random.default_rng(0)
    for target, (category, sound) in enumerate(SOUNDS.items()):
        for fold in range(1, 6):
            for take in "AB":
                name = f"{fold}-{100 * target + fold}-{take}-{target}.wav"
                t = rng.uniform(0, 5) + np.arange(int(1.5 * 44100)) / 44100  # 1.5 s: two 1-s windows
                write_wav(esc / "audio" / name, sound(t) * rng.uniform(0.5, 1.0))
                rows.append(f"{name},{fold},{target},{category},False,{100 * target + fold},{take}")
    (esc / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    common = ["--config", "configs/eval_ucf101.yaml", f"eval.out={tmp_path / 'out'}", *TINY]
    result = eval_main(["audio-linear", *common, "eval.audio.dataset=esc50", f"eval.audio.root={esc}"])
    assert [k for k in result if k.startswith("fold")] == [f"fold{f}" for f in range(1, 6)]
    assert (result["clips"], result["classes"]) == (30, 3)
    assert result["mean"]["top1"] >= 0.8  # distinct sounds: even features at initialisation separate them
    assert all(r["weight_decay"] in (1e-4, 1e-3, 1e-2) and r["val_top1"] is not None
               for k, r in result.items() if k.startswith("fold"))

    dcase = tmp_path / "dcase"
    dcase.mkdir()
    for scene, sound in SOUNDS.items():
        for n in range(1, 11):
            write_wav(dcase / f"{scene}{n:02d}.wav", sound(rng.uniform(0, 5) + np.arange(44100 * 2) / 44100))
    result = eval_main(["audio-linear", *common, "eval.audio.dataset=dcase2014", f"eval.audio.root={dcase}",
                        "eval.protocol=paper"])
    assert result["clips"] == 30 and len([k for k in result if k.startswith("fold")]) == 5
    assert all(r["val_top1"] is None for k, r in result.items() if k.startswith("fold"))  # paper: no selection
    with pytest.raises(SystemExit, match="eval.audio.root is not set"):
        eval_main(["audio-linear", *common])


@pytest.mark.parametrize("backend", ["dali", "reference", "torchcodec"])
def test_evaluation_names_a_damaged_sample_leaves_it_out_and_counts_what_it_scored(tmp_path, backend):
    """One train video whose segments do not decode: every loader (DALI, and the peers' PyAV and
    torchcodec) lets a valid sample of its shard stand in, so evaluation goes on; the damaged
    video is named in eval.out/bad_samples.jsonl and is not among the scored videos."""
    from conftest import damage, pack_demo_corpus
    from stica import distributed
    from stica.eval import load_model, video_features
    from stica.media import decoder_missing

    if backend == "torchcodec" and decoder_missing("torchcodec"):
        pytest.skip(f"torchcodec cannot run here: {decoder_missing('torchcodec')}")
    shards = pack_demo_corpus(tmp_path / "corpus", train=12, val=0)
    bad = damage(shards, 3)
    cfg = load_config("configs/demo.yaml", [f"data.shards={shards}", f"eval.out={tmp_path / 'eval'}",
                                            f"data.loader={backend}", "data.batch_size=4", "data.workers=0",
                                            "data.eval_clips=1"])
    dist = distributed.setup("gloo")
    feats, labels, keys = video_features(load_model(cfg, None), cfg, "train", dist)
    assert len(keys) == len(feats) == 11 and bad not in keys
    (record,) = [json.loads(l) for l in (tmp_path / "eval" / "bad_samples.jsonl").read_text().splitlines()]
    assert record["key"] == bad and record["split"] == "train" and record["shard"] == "train-000000.tar"
    assert record["reason"]


def test_the_reference_loader_replaces_a_damaged_training_sample_once(tmp_path):
    """Pretraining on the reference loader: the damaged sample's place is taken by a valid one of
    its shard, with its draws; it is reported once, and the next epoch does not decode it again."""
    from conftest import damage, pack_demo_corpus
    from stica.pipelines.loader import build_loader

    shards = pack_demo_corpus(tmp_path / "corpus", train=8, val=0)
    bad = damage(shards, 2)
    cfg = load_config("configs/demo.yaml", [f"data.shards={shards}", "data.batch_size=4"])
    loader = build_loader(cfg.data, backend="reference", workers=0)
    first = [k for batch in loader for k in batch["key"]]
    assert len(first) == 8 and bad not in first and len(set(first)) == 7  # the stand-in comes twice
    (record,) = loader.new_bad_samples
    assert record["key"] == bad and record["rank"] == 0 and "Error" in record["reason"]
    loader.new_bad_samples.clear()
    second = [k for batch in loader for k in batch["key"]]
    assert len(second) == 8 and bad not in second and loader.new_bad_samples == []
