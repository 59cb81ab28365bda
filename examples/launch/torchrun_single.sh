#!/usr/bin/env bash
# One node: the multi-node launcher with one node on loopback (same overrides, --check and signal forwarding).
#   RECIPE=examples/recipes/tiny_stage1.yaml NPROC=2 bash examples/launch/torchrun_single.sh [a.b=value ...]
# NPROC defaults to the number of GPUs (nvidia-smi), else 2. The layout is the recipe's unless TP/PP/EP/ETP/VPP
# (or parallel.*=... arguments) override it; see torchrun_multinode.sh.
set -euo pipefail
NPROC=${NPROC:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 2)}
port=${MASTER_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port GPUS_PER_NODE=$NPROC \
  exec bash "$(dirname "$0")/torchrun_multinode.sh" "$@"
