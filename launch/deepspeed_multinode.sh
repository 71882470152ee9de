#!/usr/bin/env bash
# bash launch/deepspeed_multinode.sh HOSTFILE TASK DATA_FILE BASE_DIR OUT_DIR [key=value ...]
#
# One task's fine-tune across nodes with the deepspeed launcher.
#   HOSTFILE   lines "node01 slots=8" (slots = ranks on that node); every host reachable by
#              passwordless ssh; "-" runs on this node only with $NPROC ranks (default 1).
#   DATA_FILE  the task's training file; BASE_DIR the model to start from; OUT_DIR the output.
#              All three on storage that every node reads (checkpoints go to OUT_DIR).
#   key=value  TrainConfig fields (zero_stage=3 max_steps=1000 lr=1e-5 ...).
# On CPU-only machines export DS_ACCELERATOR=cpu (gloo); with GPUs DeepSpeed uses NCCL.
set -euo pipefail
[ $# -ge 5 ] || { sed -n '2,12p' "$0"; exit 2; }
hostfile=$1 task=$2 data=$3 base=$4 out=$5
shift 5
port=${MASTER_PORT:-29500}
if [ "$hostfile" = "-" ]; then
  nodes=(--num_nodes 1 --num_gpus "${NPROC:-1}" --master_addr 127.0.0.1)
else
  master=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")  # rendezvous on the first host
  nodes=(--hostfile "$hostfile" --master_addr "$master")
fi
exec deepspeed "${nodes[@]}" --master_port "$port" --module cpift_dist.training.run \
  --model "$base" --data "$task=$data" --out "$out" "$@"
