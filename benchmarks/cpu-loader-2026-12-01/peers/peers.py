"""Paired CPU loader comparison on one content set: each backend one whole epoch after a warm-up
epoch, rounds interleaved; clips/s and process CPU ms per clip."""
import json, sys, time
from stica.tools.bench_loader import loader_throughput
shards, rounds = sys.argv[1], int(sys.argv[2])
rows = []
for r in range(rounds):
    for backend in ("dali", "torchcodec", "spdl", "reference"):
        t = loader_throughput(shards, backend, 2, batch_size=4, batches=None, repeats=1,
                              overrides=["data.device=cpu"])
        rows.append({"round": r, "backend": backend, "clips_per_s": t["clips_per_s"]["median"],
                     "cpu_ms_per_clip_main_process": t["cpu_ms_per_clip"]["median"]})
        print(json.dumps(rows[-1]), flush=True)
json.dump(rows, open(sys.argv[3], "w"), indent=1)
