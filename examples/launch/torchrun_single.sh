#!/usr/bin/env bash
# One node: the multi-node launcher with one node on loopback.
#   RECIPE=examples/recipes/tiny_stage1.yaml NPROC=2 EP=2 bash examples/launch/torchrun_single.sh [a.b=value ...]
set -euo pipefail
NPROC=${NPROC:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 2)}
port=${MASTER_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port GPUS_PER_NODE=$NPROC \
  exec bash "$(dirname "$0")/torchrun_multinode.sh" "$@"
