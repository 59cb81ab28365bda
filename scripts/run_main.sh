#!/usr/bin/env bash
# The main job, from a fresh machine: creates .venv if needed, then the end-to-end tiny pipeline on the
# bundled sample corpus, on CPU with 2 processes (EP2, gloo):
#   science tokenizer -> Megatron datasets (+ packed SFT data) -> mixture report
#   -> pretraining stage 1 -> stage 2 (epoch-2 mixture, from stage 1) -> SFT (from stage 2)
# Everything lands in runs/ (delete it to start over; re-running resumes finished stages instantly).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TORCHDYNAMO_DISABLE=1 PYTHONWARNINGS=ignore
export PYTHON=.venv/bin/python NPROC=${NPROC:-2} EP=${EP:-2}
echo "== 1/5 tokenizer and datasets from examples/sample_corpus"
bash scripts/prepare_sample_data.sh
echo "== 2/5 mixture (epoch 1)"
$PYTHON tools/mixture.py examples/mixtures/sample_corpus.yaml --epoch 1
for stage in "pretrain tiny_stage1" "pretrain tiny_stage2" "sft tiny_sft"; do
  set -- $stage
  echo "== $([ $2 = tiny_stage1 ] && echo 3 || ([ $2 = tiny_stage2 ] && echo 4 || echo 5))/5 $2 ($NPROC CPU processes, EP$EP)"
  STAGE=$1 RECIPE=examples/recipes/$2.yaml bash examples/launch/torchrun_single.sh 2>&1 \
    | grep -E "^\[scidfm\] [^IW]|^iter" || { echo "$2 failed; rerun without the filter to see why"; exit 1; }
done
echo
echo "Done. Checkpoints: runs/tiny/{stage1,stage2,sft}/checkpoints   TensorBoard: tensorboard --logdir runs/tiny"
