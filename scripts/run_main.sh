#!/usr/bin/env bash
# The main job, from a fresh machine: creates .venv if needed, then the end-to-end tiny pipeline on the
# bundled sample corpus, on CPU with 2 processes (EP2, gloo):
#   science tokenizer -> Megatron datasets (+ packed SFT data) -> mixture report
#   -> pretraining stage 1 -> stage 2 (epoch-2 mixture, from stage 1) -> SFT (from stage 2)
#   -> Hugging Face conversion -> zero-shot evaluation + expert-choice analysis -> greedy generation
# Everything lands in runs/ (delete it to start over; re-running resumes finished stages instantly).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-test,hf,eval} bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TORCHDYNAMO_DISABLE=1 PYTHONWARNINGS=ignore
export PYTHON=.venv/bin/python NPROC=${NPROC:-2}   # the tiny recipes run EP2 (their parallel: section)
BIN=.venv/bin   # the project's console scripts (setup_env.sh installs the project into .venv)
echo "== 1/8 tokenizer and datasets from examples/sample_corpus"
bash scripts/prepare_sample_data.sh
echo "== 2/8 mixture (epoch 1)"
$BIN/scidfm-mixture examples/mixtures/sample_corpus.yaml --epoch 1
for stage in "pretrain tiny_stage1" "pretrain tiny_stage2" "sft tiny_sft"; do
  set -- $stage
  echo "== $([ $2 = tiny_stage1 ] && echo 3 || ([ $2 = tiny_stage2 ] && echo 4 || echo 5))/8 $2 ($NPROC CPU processes, the recipe's layout)"
  RECIPE=examples/recipes/$2.yaml bash examples/launch/torchrun_single.sh 2>&1 \
    | grep -E "^\[scidfm\] [^IW]|^iter" || { echo "$2 failed; rerun without the filter to see why"; exit 1; }
done
echo "== 6/8 convert the SFT checkpoint to Hugging Face (Mixtral layout, fp32) -> runs/tiny/hf"
$BIN/scidfm-convert --direction mcore-to-hf --load runs/tiny/sft/checkpoints --save runs/tiny/hf \
  --dtype fp32 --force
echo "== 7/8 zero-shot evaluation: the paper's tables on the bundled fixtures (examples/eval/paper: stand-ins, not"
echo "       the benchmarks; chat prompts) and expert-choice analysis of the converted model"
$BIN/scidfm-evaluate --model runs/tiny/hf --suite paper --data-dir examples/eval/paper --prompt-format chat \
  --limit 12 --max-new-tokens 16 --output runs/tiny/eval.json 2>&1 | tr '\r' '\n' | grep -v -E "Loading weights|it/s]|req/s]" | sed "s/^ *$//" | cat -s
$BIN/scidfm-analyze-experts --model runs/tiny/hf --per-domain 12 --out runs/tiny/experts 2>&1 \
  | grep -E "silhouette|plots"
echo "== 8/8 greedy generation from runs/tiny/hf with transformers alone (AutoModelForCausalLM, chat template)"
$PYTHON tools/hf_generate.py --model runs/tiny/hf --chat --max-new-tokens 16 \
  --prompt "How many heavy atoms does the molecule [START_I_SMILES]CCO[END_I_SMILES] have?" 2>&1 | grep -v "Loading weights"
echo
echo "Done. Checkpoints: runs/tiny/{stage1,stage2,sft}/checkpoints   Hugging Face: runs/tiny/hf"
echo "      Evaluation: runs/tiny/eval.json   Experts: runs/tiny/experts/*.png   TensorBoard: tensorboard --logdir runs/tiny"
