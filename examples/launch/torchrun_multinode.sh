#!/usr/bin/env bash
# Multi-node torchrun: run this once on every node (same command), rendezvous from environment variables.
#   NNODES=16 NODE_RANK=<0..15> MASTER_ADDR=<node 0 host> MASTER_PORT=29500 GPUS_PER_NODE=8 \
#   RECIPE=examples/recipes/scidfm18b_stage1.yaml bash examples/launch/torchrun_multinode.sh [a.b=value ...]
#
# The recipe is the source of truth: its parallel: section (TP2 x PP2 x EP8 for scidfm18b_stage1.yaml)
# is used as is. TP, PP, EP, ETP, VPP override parallel.tp/pp/ep/etp/vpp only when set (so do
# parallel.*=... arguments, which come last and win). The stage (pretrain/sft) comes from the recipe
# (python -m scidfm_megatron.train); STAGE=pretrain|sft, if set, adds --stage STAGE, which checks that the
# recipe is of that stage.
#
# Before starting torchrun, the whole configuration is validated for NNODES x GPUS_PER_NODE processes
# (scidfm_megatron.train --check, ~1.5 s, no process group): it prints the layout that will run, e.g.
#   [scidfm] RECIPE: pretrain of scidfm-18b on TP2 x PP2 x DP32 (experts: ETP2 x EP8 x EDP4) on 128 processes ...
# or the configuration error, and then this script exits 2 without launching anything.
#
# SIGTERM / SIGINT to this script are forwarded to the training processes only: they finish the current
# step, save a checkpoint and exit 0, and so does this script. (Signalling the torchrun agent itself makes
# it exit non-zero whatever its workers did.) SLURM: slurm.sbatch starts the trainers with srun directly.
# PYTHON selects the interpreter (default: python).
#
# Automatic restart: torchrun --max-restarts MAX_RESTARTS (default 3). When a worker dies (a crash, a
# SIGKILL, the hang watchdog's exit 124, a stop by train.on_nan / checkpoint.on_save_error), the agent
# stops the others and starts the whole group again, which resumes from the newest complete checkpoint
# in checkpoint.save. MAX_RESTARTS=0 turns it off. (A stop by SIGTERM/SIGINT exits 0: nothing restarts.)
set -uo pipefail
RECIPE=${RECIPE:?set RECIPE}
NNODES=${NNODES:?set NNODES}; NODE_RANK=${NODE_RANK:?set NODE_RANK}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR}; MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAX_RESTARTS=${MAX_RESTARTS:-3}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

stage=()
case "${STAGE:-}" in
  "") ;;
  pretrain|sft) stage=(--stage "$STAGE") ;;
  *) echo "torchrun_multinode.sh: STAGE=$STAGE: expected pretrain or sft (or leave it unset: the recipe says)" >&2
     exit 2 ;;
esac
# Layout overrides: only those whose variable is set.
layout=()
for kv in tp:TP pp:PP ep:EP etp:ETP vpp:VPP; do
  var=${kv#*:}
  if [ -n "${!var:-}" ]; then layout+=("parallel.${kv%%:*}=${!var}"); fi
done
args=(${stage[@]+"${stage[@]}"} --config "$RECIPE" ${layout[@]+"${layout[@]}"} "$@")
if [ ${#layout[@]} -gt 0 ]; then echo "[launch] layout overrides from the environment: ${layout[*]}"; fi

"$PYTHON" -m scidfm_megatron.train --check --world-size $((NNODES * GPUS_PER_NODE)) "${args[@]}" || exit $?

"$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --max-restarts "$MAX_RESTARTS" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m scidfm_megatron.train "${args[@]}" &
agent=$!
forward() { pkill -"$1" -P "$agent" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
# wait returns early (status > 128) when a trapped signal arrives: keep waiting until torchrun really exits,
# then take its status (bash keeps the status of an exited child, so the last wait returns it).
while kill -0 "$agent" 2>/dev/null; do wait "$agent"; done
wait "$agent"; exit $?
