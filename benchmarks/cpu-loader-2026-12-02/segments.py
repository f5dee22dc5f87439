"""Segment length A/B: decode-only CPU per clip (reader, random start, 30-frame decode, 2 threads) and the
whole CPU loader, shards of 30-frame vs 15-frame segments, interleaved rounds."""
import json, sys, time
from nvidia.dali import pipeline_def
from stica.pipelines.clips import clip_start, decode_clip, read_shards
from stica.shards import load_manifest, shard_paths
from stica.tools.bench_loader import loader_throughput

sets = {"seg 30": sys.argv[1], "seg 15": sys.argv[2]}
def decode_cost(shards, batches=20):
    seg = load_manifest(shards)["options"]["seg_frames"]
    tars, idxs = shard_paths(shards, "train")
    @pipeline_def(batch_size=4, num_threads=2, device_id=None, exec_dynamic=True, seed=3)
    def pipe():
        segs, _, info, _ = read_shards(tars, idxs, 0, 1, shuffle=True, shuffle_buffer=64, seed=5)
        return decode_clip(segs, info, clip_start(info, 30, 7), 30, seg, "cpu")
    p = pipe(); p.build()
    for _ in range(3): p.run()
    c = time.process_time()
    for _ in range(batches): p.run()
    return (time.process_time() - c) * 1000 / (batches * 4)
rows = []
for r in range(int(sys.argv[3])):
    for name, shards in sets.items():
        d = decode_cost(shards)
        t = loader_throughput(shards, "dali", 2, batch_size=4, batches=None, repeats=1, overrides=["data.device=cpu"])
        rows.append({"round": r, "segments": name, "decode_cpu_ms_per_clip": d, "loader_clips_per_s": t["clips_per_s"]["median"],
                     "loader_cpu_ms_per_clip": t["cpu_ms_per_clip"]["median"]})
        print(json.dumps(rows[-1]), flush=True)
json.dump(rows, open(sys.argv[4], "w"), indent=1)
