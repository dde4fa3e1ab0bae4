#!/bin/bash
# Multi-node VGF training with SLURM: one task per node, accelerate starts one process per GPU.
# Hardware: N nodes x 8 GPUs. Submit with: sbatch recipes/slurm_multinode.sh recipes/gsm8k_qwen.yaml
#SBATCH --job-name=vgf-llm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
set -euo pipefail
RECIPE=${1:-recipes/gsm8k_qwen.yaml}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS_PER_NODE=8
srun bash -c "accelerate launch \
  --config_file recipes/accelerate/zero2.yaml \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_IP --main_process_port 29500 \
  -m vgf_llm.cli train --config $RECIPE"
