#!/usr/bin/env bash
# Tokenizer + Megatron datasets of the bundled sample corpus into $RUNS/ (idempotent; used by run_main.sh).
# Runs the project's console scripts installed beside $PY (its venv's bin/: scripts/setup_env.sh installs
# them), else the ones on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs}   # output root: $RUNS/tokenizer, $RUNS/data
S=examples/sample_corpus
BIN=$(dirname "$(command -v "$PY")")
run() { local exe=$BIN/$1; [ -x "$exe" ] || exe=$1; shift; "$exe" "$@"; }
mkdir -p $RUNS/data
run scidfm-build-tokenizer --base-model examples/tokenizer/base_tokenizer.model --output-dir $RUNS/tokenizer \
  --bracket-atoms-from $S/molecules.jsonl:smiles $S/papers.jsonl:text
TOK=$RUNS/tokenizer/tokenizer.model
# Epoch 2 re-samples the molecules: the two halves of molecules.jsonl are separate datasets.
head -n 1000 $S/molecules.jsonl > $RUNS/data/molecules_a.jsonl
tail -n +1001 $S/molecules.jsonl > $RUNS/data/molecules_b.jsonl
P=(--tokenizer-model $TOK --workers 2 --append-eod --no-progress)
run scidfm-preprocess "${P[@]}" --input $S/papers.jsonl --output-prefix $RUNS/data/papers --json-keys text | sed -n 2p
run scidfm-preprocess "${P[@]}" --input $S/code.jsonl --output-prefix $RUNS/data/code --json-keys text | sed -n 2p
run scidfm-preprocess "${P[@]}" --input $RUNS/data/molecules_a.jsonl --output-prefix $RUNS/data/molecules_a --json-keys smiles --span smiles=molecule | sed -n 2p
run scidfm-preprocess "${P[@]}" --input $RUNS/data/molecules_b.jsonl --output-prefix $RUNS/data/molecules_b --json-keys smiles --span smiles=molecule | sed -n 2p
run scidfm-preprocess "${P[@]}" --input $S/proteins.jsonl --output-prefix $RUNS/data/proteins --json-keys sequence --span sequence=protein | sed -n 2p
run scidfm-preprocess --tokenizer-model $TOK --workers 2 --no-progress --input $S/instructions.jsonl \
  --output-prefix $RUNS/data/sft --sft-seq-length 256 | sed -n 2p
