#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (Python 3.12, x86_64, no network), and a wheel of this project, into
# gpu_wheels/ (gitignored), with gpu_wheels/COMMIT (the commit they were made from): carry that folder to
# the machine and run scripts/gpu_check.sh there (docs/gpu.md).
#
# That machine has torch 2.11+cu130, transformers, sentencepiece, safetensors, tensorboard, triton,
# numpy, psutil, PyYAML, tqdm, pytest (+ pytest-timeout, pluggy, iniconfig, pygments), packaging; it has
# no megatron-core, zstandard, TransformerEngine or apex. "required" wheels are always installed there;
# "fallback" ones only when their module does not import (so nothing preinstalled is shadowed, and a
# machine image without one of them still runs). torch and numpy never travel.
#
# Idempotent: wheels already here are kept, other versions removed. Fails if the folder exceeds 60 MiB.
# Usage: bash scripts/gpu_wheels.sh [DIR]      (default DIR: gpu_wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-gpu_wheels}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LIMIT_MIB=60

# name==version  import-module  kind   (versions: setup.py's pins; megatron-core's own requirements are
# torch>=2.6, numpy, packaging>=24.2: all on the machine, packaging also as a fallback)
SPECS="
megatron-core==0.16.1   megatron.core   required
zstandard==0.25.0       zstandard       required
psutil==7.2.2           psutil          fallback
PyYAML==6.0.3           yaml            fallback
tqdm==4.70.1            tqdm            fallback
packaging==26.4         packaging       fallback
sentencepiece==0.2.3    sentencepiece   fallback
safetensors==0.8.0      safetensors     fallback
pytest==9.2.0           pytest          fallback
pytest-timeout==2.4.0   pytest_timeout  fallback
pluggy==1.7.0           pluggy          fallback
iniconfig==2.3.1        iniconfig       fallback
Pygments==2.21.0        pygments        fallback
"
mkdir -p "$DIR"
REQS=$(echo "$SPECS" | awk 'NF {print $1}')
# --no-deps: exactly these files (their dependencies are on the machine or in this list).
$PYTHON -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
  --platform manylinux2010_x86_64 --platform manylinux1_x86_64 -d "$DIR" $REQS

# This project as a wheel: gpu_check.sh installs it with pip (resolving its requirements against what the
# machine has and these wheels: torch stays the machine's), which is the install a GPU user does.
rm -f "$DIR"/scidfm_megatron-*.whl
LEFT=()  # the build's by-products in the tree, removed unless they were there before
for p in build scidfm_megatron.egg-info; do [ -e "$p" ] || LEFT+=("$p"); done
$PYTHON -m pip wheel -q --no-deps -w "$DIR" . >/dev/null
[ ${#LEFT[@]} -gt 0 ] && rm -rf "${LEFT[@]}"

# Keep one wheel per pinned name==version; write the manifest gpu_check.sh reads.
SPECS="$SPECS" $PYTHON - "$DIR" <<'EOF'
import os, re, sys
from pathlib import Path

d = Path(sys.argv[1])
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
specs = {}
for line in os.environ["SPECS"].strip().splitlines():
    req, module, kind = line.split()
    name, version = req.split("==")
    specs[(norm(name), version)] = (module, kind)
found = {}
project = sorted(d.glob("scidfm_megatron-*.whl"))
if len(project) != 1:
    sys.exit(f"expected one wheel of this project in {d}, found {[p.name for p in project]}")
for whl in sorted(d.glob("*.whl")):
    if whl in project:
        continue
    name, version = whl.name.split("-")[:2]
    key = (norm(name), version)
    if key not in specs or key in found:
        print(f"removing {whl.name} (not pinned here)")
        whl.unlink()
        continue
    found[key] = whl.name
missing = sorted(f"{n}=={v}" for n, v in specs if (n, v) not in found)
if missing:
    sys.exit(f"no wheel for {missing}")
with open(d / "manifest.txt", "w") as f:
    f.write("# wheel  import-module  required|fallback  (scripts/gpu_wheels.sh)\n")
    for key, whl in sorted(found.items()):
        f.write(f"{whl} {specs[key][0]} {specs[key][1]}\n")
    f.write(f"{project[0].name} scidfm_megatron project\n")
EOF

# The commit these wheels were prepared from: the GPU machine gets no .git, so the results name it from here.
if COMMIT=$(git rev-parse HEAD 2>/dev/null); then
  [ -n "$(git status --porcelain --untracked-files=no)" ] && COMMIT="$COMMIT+dirty"
  echo "$COMMIT" > "$DIR/COMMIT"
  echo "commit $COMMIT -> $DIR/COMMIT"
fi

BYTES=$(cat "$DIR"/*.whl | wc -c)
MIB=$(( (BYTES + 1048575) / 1048576 ))
ls -l "$DIR"/*.whl | awk '{printf "  %9d  %s\n", $5, $NF}'
echo "$(ls "$DIR"/*.whl | wc -l) wheels, $BYTES bytes (~$MIB MiB) in $DIR/ (limit $LIMIT_MIB MiB;" \
     "manifest: $DIR/manifest.txt)"
if [ "$BYTES" -gt $(( LIMIT_MIB * 1048576 )) ]; then
  echo "error: $DIR/ is over $LIMIT_MIB MiB: the device copy carries at most 64 MiB in all" >&2
  exit 1
fi
