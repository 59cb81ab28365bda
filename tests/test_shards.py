"""scidfm-preprocess --shard K/N over N processes + scidfm-merge-data == one process, byte for byte."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import BASE_MODEL, ROOT, SAMPLE

N = 3
# sbatch stand-in: an --array job runs its tasks at once as local processes (standing in for N nodes) and
# returns when all have succeeded; any other job runs at once. Records its arguments.
FAKE_SBATCH = r"""#!/bin/bash
echo "$@" >> "$SBATCH_LOG"
array=""; args=()
for a in "$@"; do
  case $a in
    --array=*) array=${a#--array=0-} ;;
    --export=ALL,*) export "${a#--export=ALL,}" ;;
    --*) ;;
    *) args+=("$a") ;;
  esac
done
if [ -n "$array" ]; then
  pids=()
  for i in $(seq 0 "$array"); do SLURM_ARRAY_TASK_ID=$i bash "${args[@]}" > "$SBATCH_LOG.task$i" 2>&1 & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || { cat "$SBATCH_LOG".task*; exit 1; }; done
  echo "1001;cluster"
else
  bash "${args[@]}" > "$SBATCH_LOG.job" 2>&1 || { cat "$SBATCH_LOG.job"; exit 1; }
  echo 1002
fi
"""


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, science_tokenizer_dir):
    """Inputs (a plain file split inside by byte ranges, a gzip file that goes whole, a file with bad
    records); examples/launch/preprocess_array.sbatch with a stand-in sbatch: N shard processes at once,
    then the dependent merge; and one process on the same inputs."""
    from scidfm_megatron.data.preprocess import preprocess

    d = tmp_path_factory.mktemp("shards")
    inp = d / "in"
    inp.mkdir()
    shutil.copy(SAMPLE / "papers.jsonl", inp / "a.jsonl")
    with gzip.open(inp / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write((SAMPLE / "code.jsonl").read_text(encoding="utf-8")[:60_000].rsplit("\n", 1)[0] + "\n")
    lines = (SAMPLE / "papers.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    lines[4], lines[17] = '{"text": 7}', "{broken"
    (inp / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = science_tokenizer_dir / "tokenizer.model"
    args = ["--input", str(inp), "--output-prefix", str(d / "sh"), "--tokenizer-model", str(model), "--append-eod",
            "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    sbatch = d / "sbatch"
    sbatch.write_text(FAKE_SBATCH)
    sbatch.chmod(0o755)
    r = subprocess.run(["bash", str(ROOT / "examples" / "launch" / "preprocess_array.sbatch")], capture_output=True,
                       text=True, timeout=900, cwd=ROOT,
                       env=dict(env, N=str(N), INPUT=str(inp), PREFIX=str(d / "sh"), TOKENIZER=str(model),
                                OUTPUT=str(d / "merged"), SBATCH=str(sbatch), SBATCH_LOG=str(d / "sbatch.log"),
                                PYTHON=sys.executable))
    assert r.returncode == 0, r.stdout + r.stderr
    submitted = (d / "sbatch.log").read_text().splitlines()
    assert f"--array=0-{N - 1}" in submitted[0] and "--dependency=afterok:1001" in submitted[1]
    one = preprocess([str(inp)], str(d / "one"), str(model), append_eod=True, progress=False)
    return d, model, one, args, env


def _merge(prefix, out, capsys):
    from scidfm_megatron.cli.merge_data import main

    rc = main(["--input-prefix", str(prefix), "--shards", str(N), "--output-prefix", str(out)])
    return rc, capsys.readouterr()


def test_shards_merged_are_byte_identical_to_one_run_and_reruns_skip(sharded, capsys):
    d, model, one, args, env = sharded
    manifests = [json.loads((d / f"sh.shard-{k}-of-{N}.manifest.json").read_text()) for k in range(N)]
    assert all(m["complete"] for m in manifests)
    # the plain file really was split inside, the gzip file went whole to one shard
    assert len({m["inputs"][0]["start"] for m in manifests if m["inputs"]}) == N
    assert sum(p["end"] is None for m in manifests for p in m["inputs"]) == 1
    assert sum(m["documents"]["text"] for m in manifests) == one.documents["text"]
    assert sum(m["rejected"] for m in manifests) == one.rejected == 2
    for ext in (".bin", ".idx"):
        assert (d / f"merged_text_document{ext}").read_bytes() == (d / f"one_text_document{ext}").read_bytes()
    # bad records are named by file and line as a single run names them
    rejected = sorted((r["file"], r["line"], r["reason"]) for k in range(N)
                      for r in map(json.loads, open(d / f"sh.shard-{k}-of-{N}_rejected.jsonl")))
    assert rejected == sorted((r["file"], r["line"], r["reason"])
                              for r in map(json.loads, open(d / "one_rejected.jsonl")))
    # a rerun of a finished shard is skipped and leaves its outputs alone
    bin1 = d / f"sh.shard-1-of-{N}_text_document.bin"
    before = bin1.stat().st_mtime_ns
    from scidfm_megatron.cli.preprocess import main

    assert main([*args, "--shard", f"1/{N}"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert bin1.stat().st_mtime_ns == before


@pytest.mark.parametrize("fault", ["missing", "incomplete", "damaged", "duplicated", "tokenizer"])
def test_merge_refuses_a_bad_shard_naming_it(sharded, fault, tmp_path, capsys):
    from scidfm_megatron.data.preprocess import preprocess

    d, model, one, args, env = sharded
    for f in d.glob("sh.shard-*"):
        shutil.copy(f, tmp_path / f.name)
    prefix = tmp_path / "sh"
    shard1 = [f for f in tmp_path.glob(f"sh.shard-1-of-{N}*")]
    if fault == "missing":
        for f in shard1:
            f.unlink()
        want = f"shard 1/{N}"
    elif fault == "incomplete":  # the task died after writing its data, before its manifest
        (tmp_path / f"sh.shard-1-of-{N}.manifest.json").unlink()
        want = "incomplete"
    elif fault == "damaged":  # same size, one byte changed
        b = tmp_path / f"sh.shard-1-of-{N}_text_document.bin"
        data = bytearray(b.read_bytes())
        data[10] ^= 1
        b.write_bytes(bytes(data))
        want = "sha256"
    elif fault == "duplicated":  # shard 0's files copied over shard 1's
        for f in tmp_path.glob(f"sh.shard-0-of-{N}*"):
            shutil.copy(f, tmp_path / f.name.replace(f"shard-0-of-{N}", f"shard-1-of-{N}"))
        want = "duplicated"
    else:  # shard 2 redone with another tokenizer
        for f in tmp_path.glob(f"sh.shard-2-of-{N}*"):
            f.unlink()
        preprocess([str(d / "in")], str(prefix), str(BASE_MODEL), append_eod=True, progress=False, shard=(2, N))
        want = "different tokenizer"
    rc, out = _merge(prefix, tmp_path / "merged", capsys)
    assert rc == 2 and want in out.err and (f"shard 1/{N}" in out.err or f"shard 2/{N}" in out.err), out.err
    assert not list(tmp_path.glob("merged*")), "a refused merge must write nothing"
