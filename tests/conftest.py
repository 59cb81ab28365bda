import os
import subprocess
import sys
from pathlib import Path

import pytest

from scidfm_megatron.testing.distributed import cpu_env, free_port
from scidfm_megatron.testing.runs import train_losses  # noqa: F401  (the tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "workers"
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/assets/losses/*.txt from this run (tests/test_golden_losses.py)")


# Every test is in exactly one group, run as separate CI steps (.ci/run): the group it is marked with (on the
# test, or its module's pytestmark), else "integration" when it needs the sample data a script makes (the `runs`
# fixture, which the CLI's torchrun launches start from), else "unit".
GROUPS = ("unit", "distributed", "integration")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by mark
def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        marked = {m.name for m in item.iter_markers() if m.name in GROUPS}
        if len(marked) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {sorted(marked)}: a test is in one of {GROUPS}")
        if not marked:
            item.add_marker("integration" if "runs" in item.fixturenames else "unit")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine; see docs/gpu.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def nothing_written_into_the_repository():
    """The recipes' default outputs are under the repository's runs/ (the README's main job writes there); a
    test or a tool it runs writes under its tmp_path (a benchmark once left TensorBoard files in runs/)."""
    def files():
        return {p for p in (ROOT / "runs").rglob("*") if p.is_file()} if (ROOT / "runs").exists() else set()

    before = files()
    yield
    new = sorted(str(p.relative_to(ROOT)) for p in files() - before)
    assert not new, f"the tests wrote into the repository: {new[:5]}"


SAMPLE = ROOT / "examples" / "sample_corpus"
BASE_MODEL = ROOT / "examples" / "tokenizer" / "base_tokenizer.model"


@pytest.fixture(scope="session")
def science_tokenizer_dir(tmp_path_factory):
    """The science tokenizer as the README's main job builds it (bracket atoms from the sample corpus)."""
    from scidfm_megatron.cli.build_tokenizer import main

    out = tmp_path_factory.mktemp("tokenizer") / "tok"
    assert main(["--base-model", str(BASE_MODEL), "--output-dir", str(out), "--bracket-atoms-from",
                 f"{SAMPLE}/molecules.jsonl:smiles", f"{SAMPLE}/papers.jsonl:text"]) == 0
    return out


@pytest.fixture(scope="session")
def science_tokenizer(science_tokenizer_dir):
    from scidfm_megatron.tokenizer import ScienceTokenizer

    return ScienceTokenizer(science_tokenizer_dir / "tokenizer.model")


def sample_documents():
    """Every text of the sample corpus, as the pipeline feeds it (database fields wrapped in spans)."""
    import json

    from scidfm_megatron.tokenizer import wrap_molecule, wrap_protein

    docs = []
    for name, field, wrap in (("papers.jsonl", "text", None), ("code.jsonl", "text", None),
                              ("molecules.jsonl", "smiles", wrap_molecule),
                              ("proteins.jsonl", "sequence", wrap_protein)):
        for line in open(SAMPLE / name, encoding="utf-8"):
            v = json.loads(line)[field]
            docs.append(wrap(v) if wrap else v)
    for line in open(SAMPLE / "instructions.jsonl", encoding="utf-8"):
        docs.extend(m["content"] for m in json.loads(line)["messages"])
    return docs


@pytest.fixture(scope="session")
def sample_datasets(tmp_path_factory, science_tokenizer_dir):
    """The sample corpus preprocessed as the main job does: {name: megatron prefix}."""
    from scidfm_megatron.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("data")
    model = str(science_tokenizer_dir / "tokenizer.model")
    preprocess([str(SAMPLE / "papers.jsonl")], str(out / "papers"), model, progress=False)
    preprocess([str(SAMPLE / "molecules.jsonl")], str(out / "molecules"), model, json_keys=["smiles"],
               spans={"smiles": "molecule"}, progress=False)
    preprocess([str(SAMPLE / "proteins.jsonl")], str(out / "proteins"), model, json_keys=["sequence"],
               spans={"sequence": "protein"}, progress=False)
    return {"papers": str(out / "papers_text_document"), "molecules": str(out / "molecules_smiles_document"),
            "proteins": str(out / "proteins_sequence_document"), "dir": str(out)}


# ------------------------------------------------------------------ training runs (subprocess torchrun)
RECIPES = ROOT / "examples" / "recipes"


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Tokenizer + sample-corpus datasets, made by the same script as the README's main job."""
    out = tmp_path_factory.mktemp("runs")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "prepare_sample_data.sh")], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=cpu_env({"RUNS": str(out), "PY": sys.executable}))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def overrides(runs: Path, work: Path, **extra) -> list[str]:
    """A small, fast tiny-preset run on the sample corpus, writing under ``work``."""
    base = {
        "data.tokenizer_model": runs / "tokenizer" / "tokenizer.model",
        "data.data_root": runs / "data",
        "train.seq_length": 64, "model.max_seq_length": 64, "train.global_batch_size": 8,
        "train.micro_batch_size": 2, "train.eval_interval": "null", "train.warmup_iters": 1,
        "checkpoint.save": work / "ckpt", "logging.metrics_file": work / "metrics.jsonl",
        "logging.tensorboard_dir": work / "tb", "logging.log_interval": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def cmd(nproc: int, recipe: str, args: list[str], stage: str = "pretrain", nnodes: int = 1, node_rank: int = 0,
        port: int | None = None):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}",
            f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port or free_port()}",
            "-m", "scidfm_megatron.train", "--stage", stage, "--config", str(RECIPES / recipe), *args]


def train(nproc, args, recipe="tiny_stage1.yaml", stage="pretrain", check=True, timeout=600):
    r = subprocess.run(cmd(nproc, recipe, args, stage), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=cpu_env())
    if check:
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r




@pytest.fixture(scope="session")
def stage1_fp32(runs, tmp_path_factory):
    """scidfm-tiny stage 1 in fp32 (EP2, 30 steps at LR 3e-3, evaluation at 15 and 30, TensorBoard), launched as
    two nodes of one process each on 127.0.0.1 by examples/launch/torchrun_multinode.sh. One run serves the
    two-node launch test, the learning/TensorBoard test, stage 2 and the checkpoint-shape test (test_training).
    Returns (work dir, [node 0 output, node 1 output])."""
    work = tmp_path_factory.mktemp("stage1_fp32")
    port = str(free_port())
    procs = []
    for node in (0, 1):
        env = cpu_env({"NNODES": "2", "NODE_RANK": str(node), "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": port, "RECIPE": str(RECIPES / "tiny_stage1.yaml"), "TP": "1", "PP": "1",
                       "EP": "2", "PYTHON": sys.executable})
        procs.append(subprocess.Popen(
            ["bash", str(ROOT / "examples" / "launch" / "torchrun_multinode.sh"),
             *overrides(runs, work, **{"train.train_iters": 30, "train.lr": 3e-3, "train.eval_interval": 15})],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    return work, outs


@pytest.fixture(scope="session")
def trained_tiny(runs, tmp_path_factory):
    """scidfm-tiny trained 6 steps at TP2 x PP2 x EP2 (8 processes), saved there: the checkpoint
    conversion and evaluation tests start from it."""
    work = tmp_path_factory.mktemp("tiny_tp2pp2ep2")
    train(8, overrides(runs, work, **{"train.train_iters": 6, "train.lr": 1e-3, "model.max_seq_length": 256}) +
          ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2"])
    return work / "ckpt"


@pytest.fixture(scope="session")
def hf_tiny(trained_tiny, tmp_path_factory):
    """``trained_tiny`` converted to a Hugging Face folder (fp32)."""
    from scidfm_megatron.convert.mcore_to_hf import convert_mcore_to_hf

    out = tmp_path_factory.mktemp("hf") / "tiny"
    convert_mcore_to_hf(trained_tiny, out, dtype="fp32", max_shard_size="8MB", progress=False)
    return out


def small_source_mixture(tokenizer_model, data_root, out: Path) -> Path:
    """A two-source mixture (equal weights): the sample corpus's papers and a small source of 60 molecules
    (2,003 tokens; 27 samples of 64 tokens in its 90% train split). A run of 6 global batches of 8 reads
    25 samples of the small source (one epoch planned), one of 8 batches 33 (two epochs planned): the case
    where megatron's GPTDataset reorders a source when the run is lengthened (tests/test_mixture_sft.py)."""
    import yaml

    from scidfm_megatron.data.preprocess import preprocess

    out.mkdir(parents=True, exist_ok=True)
    lines = open(SAMPLE / "molecules.jsonl", encoding="utf-8").readlines()[:60]
    (out / "small.jsonl").write_text("".join(lines), encoding="utf-8")
    preprocess([str(out / "small.jsonl")], str(out / "small"), str(tokenizer_model),
               json_keys=["smiles"], spans={"smiles": "molecule"}, progress=False)
    mix = out / "small_mixture.yaml"
    mix.write_text(yaml.safe_dump({"name": "small-source", "unit": "tokens", "data_root": str(data_root), "sources": [
        {"name": "papers", "domain": "papers", "category": "science", "tokens": 1, "data": "papers_text_document"},
        {"name": "small", "domain": "chemistry", "category": "science", "tokens": 1,
         "data": str(out / "small_smiles_document")}]}))
    return mix
