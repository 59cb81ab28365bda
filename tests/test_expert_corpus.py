"""scidfm-analyze-experts --corpus takes any folder: a domain per file (jsonl or txt, .gz too) or a domain
field; an unusable corpus stops in one line (exit 2) before any model is loaded."""

import gzip
import json
import shutil

import numpy as np
import pytest

from scidfm_megatron.cli.analyze_experts import main
from scidfm_megatron.eval.experts import CorpusError, domain_texts

TEXTS = {
    "chemistry": [f"Reaction {i}: sodium hydroxide neutralises hydrochloric acid to give water and salt."
                  for i in range(5)],
    "biology": [f"Cell {i} divides by mitosis into two daughter cells with identical chromosomes." for i in range(4)],
    "physics": [f"Body {i} falls with an acceleration of about 9.8 metres per second squared." for i in range(4)],
}


@pytest.fixture()
def corpus(tmp_path):
    d = tmp_path / "my_domains"
    d.mkdir()
    (d / "chemistry.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n"
                                               for i, t in enumerate(TEXTS["chemistry"])) + "not json\n")
    (d / "biology.txt").write_text("\n".join(TEXTS["biology"] + ["short"]) + "\n\n")
    with gzip.open(d / "physics.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": t}) + "\n" for t in TEXTS["physics"])
    (d / "tiny.txt").write_text("Only two texts of enough length here.\nAnd a second one of enough length.\n")
    (d / "notes.md").write_text("ignored: not jsonl or txt\n")
    return d


def test_any_folder_is_a_domain_per_file(corpus):
    logged = []
    groups = domain_texts(corpus, per_domain=5, text_key="body", log=logged.append)
    assert dict(groups) == {"biology": TEXTS["biology"], "chemistry": TEXTS["chemistry"], "physics": TEXTS["physics"]}
    assert list(domain_texts(corpus, per_domain=3, text_key="body").values())[1] == TEXTS["chemistry"][:3]
    assert any("chemistry.jsonl: 1 line(s) skipped, the first at line 6: not a JSON object" in m for m in logged)
    assert any("domain 'tiny': 2 text(s)" in m and "left out" in m for m in logged)


def test_one_file_with_a_domain_field(tmp_path):
    src = tmp_path / "mixed.jsonl"
    src.write_text("".join(json.dumps({"text": t, "field": d}) + "\n" for d, ts in TEXTS.items() for t in ts))
    groups = domain_texts(src, per_domain=30, domain_key="field")
    assert {k: len(v) for k, v in groups.items()} == {"chemistry": 5, "biology": 4, "physics": 4}
    # the sample corpus: papers split by their domain field, molecules / proteins wrapped in span markers,
    # the SFT file (no text) left out
    from conftest import SAMPLE

    logged = []
    groups = domain_texts(SAMPLE, per_domain=6, log=logged.append)
    assert {"code", "molecules", "proteins", "papers: chemistry", "papers: math"} <= set(groups)
    assert groups["molecules"][0].startswith("[START_I_SMILES]")
    assert groups["proteins"][0].startswith("[START_AMINO]")
    assert any("instructions.jsonl:1: no string 'text' key" in m and "left out" in m for m in logged)


def _cli(capsys, *args):
    rc = main(["--model", "/nonexistent/model", "--out", "/nonexistent/out", *map(str, args)])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_unusable_corpus_is_one_line(tmp_path, corpus, capsys):
    (tmp_path / "empty").mkdir()
    rc, err = _cli(capsys, "--corpus", tmp_path / "empty")
    assert rc == 2 and len(err) == 1 and "no *.jsonl or *.txt files" in err[0] and "--domain-key" in err[0]
    rc, err = _cli(capsys, "--corpus", tmp_path / "missing")
    assert rc == 2 and err == [
        f"scidfm-analyze-experts: error: --corpus {tmp_path / 'missing'}: no such folder or file"]
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"body": "x" * 40}) + "\n")
    rc, err = _cli(capsys, "--corpus", one)
    assert rc == 2 and err == [f"scidfm-analyze-experts: error: {one}:1: no string 'text' key (keys: ['body']); "
                               "name the text field with --text-key (a record may instead hold 'smiles' or 'sequence')"]
    rc, err = _cli(capsys, "--corpus", corpus)  # text under 'body': only the .txt domains have texts
    assert rc == 2 and "chemistry.jsonl:1: no string 'text' key" in err[-1] and "Traceback" not in "\n".join(err)
    two = tmp_path / "two"  # a usable corpus, a model folder that is not one: one line too
    two.mkdir()
    for name in ("a", "b"):
        (two / f"{name}.txt").write_text("a line of text that is long enough\n" * 3)
    rc, err = _cli(capsys, "--corpus", two)
    assert rc == 2 and len(err) == 2 and err[-1].startswith("scidfm-analyze-experts: error: ") \
        and "/nonexistent/model" in err[-1], err
    single = tmp_path / "only.txt"  # one domain: nothing to compare
    single.write_text("a line of text that is long enough\n" * 3)
    with pytest.raises(CorpusError, match=r"1 domain\(s\) with >= 3 texts .*give at least 2"):
        domain_texts(single)


def test_analysis_runs_on_an_arbitrary_folder(tmp_path, corpus, science_tokenizer_dir):
    """E_T and the plots for the folder's domains, with a tiny random Mixtral in a Hugging Face folder."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from scidfm_megatron.tokenizer import ScienceTokenizer

    vocab = ScienceTokenizer(science_tokenizer_dir / "tokenizer.model").vocab_size
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128)
    hf = tmp_path / "hf"
    MixtralForCausalLM(cfg).save_pretrained(hf)
    shutil.copy(science_tokenizer_dir / "tokenizer.model", hf / "tokenizer.model")
    assert main(["--model", str(hf), "--corpus", str(corpus), "--text-key", "body", "--per-domain", "4",
                 "--max-tokens", "32", "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["domains"] == {"biology": 4, "chemistry": 4, "physics": 4} and summary["num_layers"] == 2
    E = np.load(tmp_path / "out" / "expert_choice.npz")["E_T"]
    assert E.shape == (12, 2 * 4)
    np.testing.assert_allclose(E.reshape(12, 2, 4).sum(-1), 1.0, atol=1e-9)
    assert (tmp_path / "out" / "expert_choice_tsne.png").read_bytes()[:4] == b"\x89PNG"
