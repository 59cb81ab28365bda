#!/usr/bin/env bash
# The main job, from a fresh machine: creates .venv if needed, then runs the end-to-end tiny pipeline.
# Today: a tiny SciDFM-architecture MoE trained with expert parallelism (EP2) on 2 CPU processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TORCHDYNAMO_DISABLE=1 PYTHONWARNINGS=ignore
NPROC=${NPROC:-2}
echo "== tiny SciDFM MoE, EP2 on $NPROC CPU processes (gloo)"
.venv/bin/torchrun --nproc-per-node "$NPROC" --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29511}" \
  tools/train_synthetic.py --preset scidfm-tiny --ep 2 --steps 40 --vocab 1000
