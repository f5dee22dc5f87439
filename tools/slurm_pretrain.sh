#!/bin/bash
# STiCA pretraining on SLURM: one torchrun agent per node, one worker per GPU, a c10d rendezvous
# on the allocation's first host. Requeued on the 2-minute warning; the rerun resumes from the run
# directory's checkpoint, and a failed or hung worker restarts the group (--max-restarts).
#
#   sbatch tools/slurm_pretrain.sh data.shards=/data/k400/shards run.dir=/shared/runs/k400
#
# STICA_CONFIG (default configs/pretrain_kinetics.yaml) and STICA_RDZV_PORT (29500) change the
# config and the rendezvous port; every other argument is a key=value config override.
#SBATCH --nodes=8 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64
#SBATCH --time=72:00:00 --signal=B:USR1@120 --requeue
set -euo pipefail
# A requeued or replaced node rejoins a rendezvous whose rank-0 node may change: torchrun's shared
# store then deadlocks the new round (measured, torch 2.13; docs/nodes.md).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# awk reads the whole list: `head -n1` would close the pipe early, and pipefail fails on the SIGPIPE.
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
trap 'scontrol requeue "$SLURM_JOB_ID"' USR1
srun --kill-on-bad-exit=1 torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="${SLURM_GPUS_ON_NODE:-8}" \
    --max-restarts=3 --rdzv_backend=c10d --rdzv_endpoint="$head:${STICA_RDZV_PORT:-29500}" \
    --rdzv_id="$SLURM_JOB_ID" \
    -m stica.train --config "${STICA_CONFIG:-configs/pretrain_kinetics.yaml}" "$@" &
wait
