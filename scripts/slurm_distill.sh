#!/usr/bin/env bash
# Distil on N nodes x G GPUs under SLURM: one `accelerate launch` per node (srun starts them), each with
# its node rank, all meeting at the first node. The distill config's train.batch_size is the global batch
# over all N x G processes.
#
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 scripts/slurm_distill.sh \
#       --config configs/sd15/dmd2_1step.yaml train.output_dir=runs/sd15-dmd2
#
# ACCELERATE_CONFIG (default configs/accelerate/multinode.yaml; configs/accelerate/fsdp.yaml's settings
# for sharded weights) and GPUS_PER_NODE (default: SLURM's count) may be set in the environment.
#SBATCH --job-name=stepdistill
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
NODES=${SLURM_NNODES:?run this under sbatch (SLURM_NNODES is not set)}
GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}}
if [ "${GPUS:-0}" -lt 1 ]; then echo "error: no GPUs on this node (set GPUS_PER_NODE)" >&2; exit 2; fi
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/multinode.yaml}
# SIGTERM from SLURM (preemption, the time limit) reaches every rank: the run writes a checkpoint and exits 3;
# resubmitting the same command continues it.
srun --kill-on-bad-exit=1 bash -c "accelerate launch --config_file '$CONFIG' \
    --num_machines $NODES --num_processes $((NODES * GPUS)) --machine_rank \$SLURM_NODEID \
    --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT \
    train/distill.py $(printf '%q ' "$@")"
