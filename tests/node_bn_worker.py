"""Run by test_nodes under two torchrun agents: one synced BN call over sync_group('node'), each
rank's output and running statistics saved for the test to compare with one process per node."""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from stica import distributed
from stica.batchnorm import SyncBatchNorm, sync_group

out = Path(sys.argv[1])
d = distributed.setup("gloo", timeout_s=120)
torch.manual_seed(0)
x = torch.randn(2 * d.world, 3, 2, 4, 4) * torch.arange(1.0, 2 * d.world + 1).view(-1, 1, 1, 1, 1)  # nodes differ
group = sync_group("node", d.world, d.local_world)
bn = SyncBatchNorm(3, group=group).train()
y = bn(x[2 * d.rank:2 * d.rank + 2])
if d.rank == 0:
    torch.save(x, out / "input.pt")
torch.save({"node": int(os.environ["GROUP_RANK"]), "group": dist.get_process_group_ranks(group), "y": y.detach(),
            "running_mean": bn.running_mean, "running_var": bn.running_var}, out / f"rank{d.rank}.pt")
distributed.teardown()
