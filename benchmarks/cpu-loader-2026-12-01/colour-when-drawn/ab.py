"""Paired A/B of the CPU loader: the colour ops for every clip (HEAD before the change) vs only for the
clips that draw them (the working tree); each variant one whole epoch after a warm-up epoch, interleaved."""
import json, sys
sys.path.insert(0, "/tmp/exp")
import stica.pipelines.pretrain as pretrain
import pretrain_base
from stica.tools.bench_loader import loader_throughput
shards, rounds, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
variants = {"every clip": pretrain_base.video_view, "clips that draw them": pretrain.video_view}
rows = []
for r in range(rounds):
    for name, fn in variants.items():
        pretrain.video_view = fn
        t = loader_throughput(shards, "dali", 2, batch_size=4, batches=None, repeats=1, overrides=["data.device=cpu"])
        rows.append({"round": r, "colour ops for": name, "clips_per_s": t["clips_per_s"]["median"],
                     "cpu_ms_per_clip": t["cpu_ms_per_clip"]["median"]})
        print(json.dumps(rows[-1]), flush=True)
json.dump(rows, open(out, "w"), indent=1)
