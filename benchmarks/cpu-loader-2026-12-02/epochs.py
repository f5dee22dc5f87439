"""The CPU a whole epoch costs with DALI's iterator (A) and with the epoch iterator (B), epochs
of one DALI CPU loader alternating between the two (2 threads, batch 4); process CPU s per epoch."""
import json, sys, time
from nvidia.dali.plugin.pytorch import DALIGenericIterator
import stica.pipelines.loader as loader
from stica.config import load_config

shards, pairs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = load_config("configs/pretrain_kinetics.yaml", [f"data.shards={shards}", "data.batch_size=4", "data.threads=2",
                                                     "data.device=cpu"]).data
ours = loader.EpochIterator
dali = lambda pipe, names, policy: DALIGenericIterator([pipe], names, reader_name="reader", last_batch_policy=policy)
l = loader.DaliLoader(cfg)
list(l)  # warm-up epoch
rows = []
for i in range(2 * pairs):
    name = "A: DALI's iterator" if i % 2 == 0 else "B: epoch iterator"
    loader.EpochIterator = dali if i % 2 == 0 else ours
    l._next = None  # the next epoch builds its pipeline with this variant
    c, t = time.process_time(), time.perf_counter()
    n = sum(1 for _ in l)
    rows.append({"epoch": l.epoch - 1, "variant": name, "batches": n, "cpu_s": time.process_time() - c,
                 "wall_s": time.perf_counter() - t})
    print(json.dumps(rows[-1]), flush=True)
json.dump(rows, open(out, "w"), indent=1)
