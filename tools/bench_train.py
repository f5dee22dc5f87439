"""End to end for stica-bench: the real trainer on real shards, its clips/s and data wait."""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from stica.config import load_config
from stica.tools.measure import DEFAULT_CONFIG


def run_end_to_end(shards: str, p: dict, loader: str, overrides: list[str] = ()) -> dict:
    """The real trainer on the real shards for p['e2e_steps'] steps: clips/s and data wait per log
    window (the first two windows are warm-up: pipeline start, cuDNN's kernel search), the bounding side."""
    from stica.train import main as train

    with tempfile.TemporaryDirectory() as run_dir:
        args = [f"data.shards={shards}", f"run.dir={run_dir}", f"model.width={p['width']}",
                f"data.batch_size={p['batch']}", f"data.loader={loader}", f"train.max_steps={p['e2e_steps']}",
                f"train.log_every={p.get('log_every', 1)}", "train.ckpt_every=1000000", "optim.epochs=1000",
                *overrides]
        train(["--config", DEFAULT_CONFIG, *args])
        records = [json.loads(l) for l in (Path(run_dir) / "log.jsonl").read_text().splitlines()][2:]
    rate = statistics.median(r["clips_per_s"] for r in records)
    wait = statistics.median(r["data_wait_pct"] for r in records)
    cfg = load_config(DEFAULT_CONFIG, list(overrides))
    return {"loader": loader, "steps": p["e2e_steps"], "steps_timed": len(records), "clips_per_s": rate,
            "data_wait_pct": wait, "bound_by": "loader" if wait > 10 else "model", "width": p["width"],
            "batch": p["batch"], "device": cfg.data.device, "threads": cfg.data.threads,
            "compile": cfg.train.compile, "gpu_mem_gib": records[-1].get("gpu_mem_gib")}
