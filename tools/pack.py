"""The packing job: sources -> shuffled GNU tar shards, resumable and deterministic.

Crash safety: a shard is written as `NAME.tmp`, renamed when complete, indexed, and only then
recorded as one line in `_journal-{split}.jsonl` (with the failures met since the previous
shard and the position reached in the shuffled input order). A rerun trusts the journal
alone, so a killed run leaves nothing a reader could mistake for a finished shard, and no
sample is written or reported twice. manifest.json and failures.jsonl are derived from the
journals at the end.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tarfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stica.shards import FORMAT_VERSION, MEMBERS, part_tag, shard_name
from stica.tools.display import applied
from stica.tools.sources import MAX_KEY, Source, class_list
from stica.tools.supervise import supervised_map
from stica.tools.transcode import PackError, PackOptions, transcode


def _transcode(source: Source, label_index: int, opts: PackOptions):
    try:
        return transcode(source.path, source.key, source.label, label_index, opts), None
    except PackError as e:
        return None, {"stage": e.stage, "reason": e.reason}
    except Exception as e:  # a bug or an FFmpeg surprise must not kill a multi-day job: record it
        return None, {"stage": "transcode", "reason": f"{type(e).__name__}: {e}"}


def _work(args):
    """Transcode one source; one listed in several splits (UCF-101's three folds) is transcoded
    once, its result (or failure) kept in `cache` for the other splits. The last value says
    whether it was transcoded here (False: taken from the cache)."""
    source, label_index, opts, cache = args
    if cache is None:
        return (source, *_transcode(source, label_index, opts), True)
    path = cache / (hashlib.sha1(f"{source.path}\0{source.key}\0{label_index}".encode()).hexdigest() + ".pkl")
    if path.exists():
        return (source, *pickle.loads(path.read_bytes()), False)
    outcome = _transcode(source, label_index, opts)
    _write_atomic(path, pickle.dumps(outcome))
    return (source, *outcome, True)


def _write_atomic(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Streams samples into `NAME.tmp`; `close()` publishes tar + index and returns its record."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.GNU_FORMAT)
        self.samples = self.bytes = 0

    def add(self, key: str, members: dict[str, bytes]):
        # DALI's reader rules (see sources.clean_key); a key breaking them would cost the whole shard.
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,%d}" % MAX_KEY, key):
            raise ValueError(f"sample key {key!r} is not readable by DALI's webdataset reader")
        for ext in MEMBERS:
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode = len(data), 0o644  # mtime, uid, names stay 0/"": byte-identical reruns
            self.tar.addfile(info, io.BytesIO(data))
            self.bytes += len(data)
        self.samples += 1

    def close(self) -> dict:
        from wds2idx import IndexCreator  # ships with DALI; writes the index format its reader expects

        self.tar.close()
        with open(self.tmp, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        os.replace(self.tmp, self.path)
        idx = self.path.with_suffix(".idx")
        with IndexCreator(str(self.path), str(idx) + ".tmp", verbose=False) as creator:
            creator.create_index()
        os.replace(str(idx) + ".tmp", idx)
        return {"name": self.path.name, "samples": self.samples, "bytes": self.path.stat().st_size,
                "sha256": digest}


def read_journal(path: Path) -> list[dict]:
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[:text.rfind("\n") + 1]
    if complete != text:  # a line cut by a crash: drop it (its shard is redone) before appending more
        _write_atomic(path, complete.encode())
    return [json.loads(line) for line in complete.splitlines()]


def pool_start_method() -> str:
    """fork where this process runs one thread; otherwise a fork server. Forking a process that
    already runs threads (torch's, DALI's, OpenBLAS's, a test runner's) can leave a worker
    holding a lock no thread will release: a CI run hung so. A fork server's workers import the
    caller's main module instead, which needs the usual `if __name__ == "__main__":` guard in a
    script that packs."""
    with open("/proc/self/status") as f:
        threads = int(next(line.split()[1] for line in f if line.startswith("Threads:")))
    return "fork" if threads == 1 else "forkserver"


def pack_split(sources: list[Source], split: str, out: Path, classes: list[str], opts: PackOptions,
               seed: int, shard_bytes: int, shard_samples: int | None, workers: int,
               shared: set[str] = frozenset(), part: tuple[int, int] | None = None,
               video_timeout: float = 600.0) -> dict:
    """`shared`: the source paths listed in other splits too (transcoded once, through a cache).
    `part`: (I, N) when this is part I of a job packed on N machines into one --out.
    `video_timeout`: seconds one video may take before its worker is replaced and it is reported."""
    tag = part_tag(part)
    journal_path = out / f"_journal-{split}{tag}.jsonl"
    journal = read_journal(journal_path)
    for stale in out.glob(f"{split}{tag}-[0-9]*.tmp"):  # this part's only: others may be packing beside it
        stale.unlink()
    order = np.random.default_rng(seed).permutation(len(sources))
    ordered = [sources[i] for i in order]
    start = journal[-1]["next"] if journal else 0
    shard_index = sum(1 for r in journal if r["shard"] is not None)
    failed_before = sum(len(r["failures"]) for r in journal)

    done = start

    def publish(writer, failures, position):
        nonlocal done, concealed, normalised
        done = position
        record = {"shard": None, "next": position, "failures": failures, "concealed": concealed,
                  "normalised": dict(normalised)}
        concealed, normalised = [], collections.Counter()
        if writer is not None:
            record.update(shard=shard_index, **writer.close())
        with open(journal_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    label_index = {c: i for i, c in enumerate(classes)}
    cache = out / f"_transcoded{tag}"
    if shared:
        cache.mkdir(exist_ok=True)
    jobs = [(s, label_index.get(s.label, -1), opts, cache if s.path in shared else None) for s in ordered[start:]]
    writer, failures, concealed = None, [], []  # concealed: this shard's videos with corrupt packets hidden
    normalised = collections.Counter()  # this shard's videos by what was changed to show them as a player does
    bar = tqdm(total=len(ordered), initial=start, unit="video", desc=f"pack {split}", smoothing=0.05)
    bar.set_postfix(failed=failed_before)
    first_use = {}
    for s in sources:  # sorted by (key, path): of two inputs with one key, the first path wins
        first_use.setdefault(s.key, s.path)
    # Worker processes even for one worker: a decoder that segfaults or hangs costs its video, not the job.
    results = supervised_map(_work, jobs, workers, video_timeout, lambda job, failure: (job[0], None, failure, True),
                             pool_start_method())
    transcoded = 0
    try:
        for position, (source, result, failure, fresh) in enumerate(results, start=start + 1):
            transcoded += fresh
            if failure is None and first_use[source.key] != source.path:
                failure = {"stage": "list", "reason": f"duplicate key {source.key!r}, also {first_use[source.key]}"}
            if failure is not None:
                failures.append({"path": source.path, "key": source.key, "split": split, **failure})
                bar.set_postfix(failed=failed_before + len(failures))
            else:
                if writer is None:
                    writer = ShardWriter(out / shard_name(split, shard_index, part))
                writer.add(source.key, result["members"])
                meta = result["meta"]
                normalised.update(applied(meta["display"]))
                if sum(meta["concealed_packets"].values()):
                    concealed.append({"key": source.key, "path": source.path, "packets": meta["concealed_packets"],
                                      "seconds": meta["concealed_seconds"]})
                if writer.bytes >= shard_bytes or (shard_samples and writer.samples >= shard_samples):
                    publish(writer, failures, position)
                    failed_before += len(failures)
                    writer, failures, shard_index = None, [], shard_index + 1
            bar.update(1)
        if writer is not None or failures or done < len(ordered):
            publish(writer, failures, len(ordered))
    finally:
        bar.close()
        results.close()  # stops the workers
    return {**summarize(read_journal(journal_path)), "transcoded": transcoded}


def summarize(journal: list[dict]) -> dict:
    shards = [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in journal if r["shard"] is not None]
    return {"shards": shards, "samples": sum(s["samples"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "failures": [f for r in journal for f in r["failures"]],
            "concealed": [c for r in journal for c in r.get("concealed", [])],
            "normalised": normalised_total(journal)}


def in_part(source: Source, part: tuple[int, int]) -> bool:
    """Part I of N takes the keys whose hash is I mod N: deterministic on every machine, and all
    inputs of one key land in one part (duplicate keys are still found)."""
    return int(hashlib.sha1(source.key.encode()).hexdigest(), 16) % part[1] == part[0]


def run(sources: list[Source], out: str | Path, opts: PackOptions, seed: int = 0,
        shard_bytes: int = 1 << 30, shard_samples: int | None = None, workers: int = 1,
        part: tuple[int, int] | None = None, video_timeout: float = 600.0) -> dict:
    """Pack `sources` into `out`; with part=(I, N), only part I of N (see in_part) and its own
    journals, then `merge` once every part is done."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = class_list(sources)  # from every source: label indices agree across parts
    job = {"format_version": FORMAT_VERSION, "options": asdict(opts), "seed": seed, "shard_bytes": shard_bytes,
           "shard_samples": shard_samples, "classes": classes, "inputs": len(sources),
           "parts": part[1] if part else 1}
    tag = part_tag(part)
    job_path = out / f"_job{tag}.json"
    if job_path.exists() and json.loads(job_path.read_text()) != job:
        raise SystemExit(f"{out}: holds a packing job with other inputs or options ({job_path}); "
                         "rerun with the same arguments to resume, or choose another --out")
    _write_atomic(job_path, json.dumps(job, indent=1).encode())
    if part is not None:
        sources = [s for s in sources if in_part(s, part)]

    splits = {}
    listed = collections.Counter(s.path for s in sources)
    shared = {path for path, n in listed.items() if n > 1}
    for split in sorted({s.split for s in sources}):
        members = sorted((s for s in sources if s.split == split), key=lambda s: (s.key, s.path))
        splits[split] = pack_split(members, split, out, classes, opts, seed, shard_bytes, shard_samples, workers,
                                   shared, part, video_timeout)
    shutil.rmtree(out / f"_transcoded{tag}", ignore_errors=True)  # every split is written: the cache has served

    failures = [f for s in splits.values() for f in s.pop("failures")]
    failed_paths = {f["path"] for f in failures}
    source_bytes = sum(os.path.getsize(s.path) for s in sources if s.path not in failed_paths)
    transcoded = sum(v.pop("transcoded") for v in splits.values())
    summary = {"packed": {k: v["samples"] for k, v in splits.items()}, "failures": failures, "transcoded": transcoded,
               "concealed": sum(len(v["concealed"]) for v in splits.values()),
               "normalised": normalised_total(splits.values()),
               "shard_bytes": sum(v["bytes"] for v in splits.values()), "source_bytes": source_bytes}
    if part is not None:  # this part is complete: merge writes the manifest once all are
        _write_atomic(out / f"_done{tag}.json", json.dumps({"splits": splits, "failures": failures}).encode())
        return summary
    write_outputs(out, job, splits, failures)
    return summary


def normalised_total(records) -> dict[str, int]:
    """The `normalised` counts of journal records, splits or parts, summed (journals written
    before the counts existed have none)."""
    return dict(sum((collections.Counter(r.get("normalised", {})) for r in records), collections.Counter()))


def write_outputs(out: Path, job: dict, splits: dict, failures: list[dict]):
    # "normalised": videos by what the packer changed so that the packed picture is what a player
    # shows (tools/display.py); per split too. A user sees at a glance that their phone footage was turned.
    manifest = {**{k: job[k] for k in ("format_version", "options", "seed", "classes")},
                "num_classes": len(job["classes"]), "splits": splits, "failed": len(failures),
                "normalised": normalised_total(splits.values())}
    _write_atomic(out / "manifest.json", json.dumps(manifest, indent=1).encode())
    _write_atomic(out / "failures.jsonl", "".join(json.dumps(f) + "\n" for f in failures).encode())
    _write_atomic(out / "classes.txt", "".join(c + "\n" for c in job["classes"]).encode())


def merge(out: str | Path) -> dict:
    """The manifest of a job packed in parts (`--part I/N`), once every part is complete."""
    out = Path(out)
    jobs = {int(p.stem.split("-p")[1]): json.loads(p.read_text()) for p in out.glob("_job-p[0-9]*.json")}
    if not jobs:
        raise SystemExit(f"{out}: no parts to merge (pack with --part I/N writes _job-pNNN.json)")
    first = next(iter(jobs.values()))
    n = first["parts"]
    differ = [i for i, j in jobs.items() if j != first]
    if differ:
        raise SystemExit(f"{out}: parts {differ} were packed with other inputs or options than part "
                         f"{next(iter(jobs))}; repack them with the same arguments")
    done_paths = [out / f"_done{part_tag((i, n))}.json" for i in range(n)]
    missing = [i for i, path in enumerate(done_paths) if not path.exists()]
    if missing:
        raise SystemExit(f"{out}: part(s) {', '.join(f'{i}/{n}' for i in missing)} not complete (no "
                         f"_done-pNNN.json): run or resume them, then merge again")
    done = [json.loads(path.read_text()) for path in done_paths]
    splits = {}
    for name in sorted({s for d in done for s in d["splits"]}):
        parts = [d["splits"][name] for d in done if name in d["splits"]]
        splits[name] = {"shards": [s for p in parts for s in p["shards"]], "samples": sum(p["samples"] for p in parts),
                        "bytes": sum(p["bytes"] for p in parts), "concealed": [c for p in parts for c in p["concealed"]],
                        "normalised": normalised_total(parts)}
    failures = [f for d in done for f in d["failures"]]
    write_outputs(out, first, splits, failures)
    return {"parts": n, "packed": {k: v["samples"] for k, v in splits.items()}, "failures": len(failures)}
