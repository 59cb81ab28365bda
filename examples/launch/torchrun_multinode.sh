#!/usr/bin/env bash
# Multi-node torchrun: run this once on every node (same command), rendezvous from environment variables.
#   NNODES=16 NODE_RANK=<0..15> MASTER_ADDR=<node 0 host> MASTER_PORT=29500 GPUS_PER_NODE=8 \
#   RECIPE=examples/recipes/scidfm18b_stage1.yaml TP=2 PP=2 EP=8 bash examples/launch/torchrun_multinode.sh
# World size = NNODES x GPUS_PER_NODE must be a multiple of TP*PP and of ETP*EP*PP (checked before start).
#
# SIGTERM / SIGINT to this script are forwarded to the training processes only: they finish the current
# step, save a checkpoint and exit 0, and so does this script. (Signalling the torchrun agent itself makes
# it exit non-zero whatever its workers did.) SLURM: --signal=B:TERM@300 targets this script.
set -uo pipefail
RECIPE=${RECIPE:?set RECIPE}
STAGE=${STAGE:-pretrain}
NNODES=${NNODES:?set NNODES}; NODE_RANK=${NODE_RANK:?set NODE_RANK}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR}; MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TP=${TP:-1}; PP=${PP:-1}; EP=${EP:-1}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m scidfm_megatron.$STAGE --config "$RECIPE" parallel.tp=$TP parallel.pp=$PP parallel.ep=$EP "$@" &
agent=$!
forward() { pkill -"$1" -P "$agent" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
rc=0
while kill -0 "$agent" 2>/dev/null; do
  wait "$agent"; rc=$?   # returns early when a trapped signal arrives; loop until torchrun really exits
done
exit $rc
