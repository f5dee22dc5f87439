"""Paired A/B/C of the DALI CPU loader, each variant one whole epoch after a warm-up epoch,
interleaved round by round: A = DALI's iterator and the colour code as of HEAD (`git show
HEAD:pipelines/pretrain.py` saved as /tmp/exp/pretrain_head.py), B = the epoch iterator that
schedules only the runs its epoch reads, C = B plus the one-pass colour (the working tree)."""
import json, sys
sys.path.insert(0, "/tmp/exp")
from nvidia.dali.plugin.pytorch import DALIGenericIterator
import pretrain_head
import stica.pipelines.loader as loader
import stica.pipelines.pretrain as pretrain
from stica.tools.bench_loader import loader_throughput

shards, rounds, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dali_iterator = lambda pipe, names, policy: DALIGenericIterator([pipe], names, reader_name="reader", last_batch_policy=policy)
variants = {"A: DALI's iterator, colour as before": (dali_iterator, pretrain_head.video_view),
            "B: epoch iterator, colour as before": (loader.EpochIterator, pretrain_head.video_view),
            "C: epoch iterator, one-pass colour": (loader.EpochIterator, pretrain.video_view)}
rows = []
for r in range(rounds):
    for name, (iterator, view) in variants.items():
        loader.EpochIterator, pretrain.video_view = iterator, view
        t = loader_throughput(shards, "dali", 2, batch_size=4, batches=None, repeats=1, overrides=["data.device=cpu"])
        rows.append({"round": r, "variant": name, "clips_per_s": t["clips_per_s"]["median"],
                     "cpu_ms_per_clip": t["cpu_ms_per_clip"]["median"]})
        print(json.dumps(rows[-1]), flush=True)
json.dump(rows, open(out, "w"), indent=1)
