import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "workers"
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine; see docs/gpu.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
                              ("molecules.jsonl", "smiles", wrap_molecule), ("proteins.jsonl", "sequence", wrap_protein)):
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
