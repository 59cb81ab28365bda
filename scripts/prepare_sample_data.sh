#!/usr/bin/env bash
# Tokenizer + Megatron datasets of the bundled sample corpus into $RUNS/ (idempotent; used by run_main.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs}   # output root: $RUNS/tokenizer, $RUNS/data
S=examples/sample_corpus
mkdir -p $RUNS/data
$PY tools/build_tokenizer.py --base-model examples/tokenizer/base_tokenizer.model --output-dir $RUNS/tokenizer \
  --bracket-atoms-from $S/molecules.jsonl:smiles $S/papers.jsonl:text
TOK=$RUNS/tokenizer/tokenizer.model
# Epoch 2 re-samples the molecules: the two halves of molecules.jsonl are separate datasets.
head -n 1000 $S/molecules.jsonl > $RUNS/data/molecules_a.jsonl
tail -n +1001 $S/molecules.jsonl > $RUNS/data/molecules_b.jsonl
P="tools/preprocess_data.py --tokenizer-model $TOK --workers 2 --append-eod --no-progress"
$PY $P --input $S/papers.jsonl --output-prefix $RUNS/data/papers --json-keys text | sed -n 2p
$PY $P --input $S/code.jsonl --output-prefix $RUNS/data/code --json-keys text | sed -n 2p
$PY $P --input $RUNS/data/molecules_a.jsonl --output-prefix $RUNS/data/molecules_a --json-keys smiles --span smiles=molecule | sed -n 2p
$PY $P --input $RUNS/data/molecules_b.jsonl --output-prefix $RUNS/data/molecules_b --json-keys smiles --span smiles=molecule | sed -n 2p
$PY $P --input $S/proteins.jsonl --output-prefix $RUNS/data/proteins --json-keys sequence --span sequence=protein | sed -n 2p
$PY tools/preprocess_data.py --tokenizer-model $TOK --workers 2 --no-progress --input $S/instructions.jsonl \
  --output-prefix $RUNS/data/sft --sft-seq-length 256 | sed -n 2p
