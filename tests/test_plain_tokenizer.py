"""A plain SentencePiece model end to end, and data tied to its tokenizer (issue 19).

Everything runs in this process, through the CLIs' ``main``: preprocessing, ``scidfm-train --check`` and
training (1 process, 2 steps of scidfm-tiny at the plain model's 32000-piece vocabulary), conversion,
``AutoTokenizer`` on the sample corpus, evaluation.
"""

import json
import shutil

import pytest

from conftest import BASE_MODEL, RECIPES, SAMPLE, sample_documents

PLAIN_VOCAB = 32000  # examples/tokenizer/base_tokenizer.model: a plain Llama-style SentencePiece BPE


def entry(capsys, recipe, *overrides):
    from scidfm_megatron.cli.train import main

    capsys.readouterr()
    rc = main(argv=["--config", str(RECIPES / recipe), "--check", "--world-size", "1", *map(str, overrides)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def mixture(path, data_root):
    path.write_text(f"name: plain\nunit: tokens\ndata_root: {data_root}\nsources:\n"
                    "  - {name: papers, domain: papers, category: science, tokens: auto, data: papers_text_document}\n")
    return path


def run_args(work, data, **extra):
    base = {"data.tokenizer_model": BASE_MODEL, "data.mixture": mixture(work / "mix.yaml", data),
            "data.data_root": data, "model.vocab_size": PLAIN_VOCAB, "model.num_layers": 2, "parallel.ep": 1,
            "train.train_iters": 2,
            "train.seq_length": 64, "model.max_seq_length": 64, "train.global_batch_size": 4,
            "train.micro_batch_size": 2, "train.warmup_iters": 1, "train.eval_interval": "null",
            "checkpoint.save": work / "ckpt", "logging.tensorboard_dir": "null", "logging.log_interval": 1}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def plain_data(tmp_path_factory):
    from scidfm_megatron.data.preprocess import preprocess

    work = tmp_path_factory.mktemp("plain")
    data = work / "data"
    data.mkdir()
    preprocess([str(SAMPLE / "papers.jsonl")], str(data / "papers"), str(BASE_MODEL), progress=False)
    return work, data


def test_plain_tokenizer_end_to_end(plain_data, capsys, tmp_path, monkeypatch):
    """preprocess -> --check (stage 1 and 2) -> train -> convert -> AutoTokenizer ids == SentencePiece's on
    every sample document -> evaluate (raw prompts); SFT and chat prompts refused in one line."""
    import numpy as np
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    work, data = plain_data
    sp = spm.SentencePieceProcessor(model_file=str(BASE_MODEL))
    texts = [json.loads(line)["text"] for line in open(SAMPLE / "papers.jsonl", encoding="utf-8")]
    ds = IndexedDataset(str(data / "papers_text_document"))
    assert [ds[k].tolist() for k in (0, len(texts) - 1)] == [sp.encode(texts[k]) + [sp.eos_id()]
                                                             for k in (0, len(texts) - 1)]

    rc, out, err = entry(capsys, "tiny_stage1.yaml", *run_args(work, data))
    assert rc == 0 and "configuration OK" in out, err
    from scidfm_megatron.cli.prepare_data import main as prepare  # the indices, built ahead with this tokenizer

    assert prepare(["--config", str(RECIPES / "tiny_stage1.yaml"), *run_args(work, data),
                    f"data.cache_dir={work / 'idx'}"]) == 0
    assert "epoch 1: train" in capsys.readouterr().out and any((work / "idx").rglob("*.npy"))
    rc, out, err = entry(capsys, "tiny_sft.yaml", f"data.tokenizer_model={BASE_MODEL}",
                         f"model.vocab_size={PLAIN_VOCAB}",
                         "parallel.ep=1", "checkpoint.init_from=null")
    assert rc == 2 and err.count("\n") == 1 and "train.stage: sft needs the chat markers of a science tokenizer" in err
    assert f"scidfm-build-tokenizer --base-model {BASE_MODEL}" in err

    from scidfm_megatron.cli.train import main
    from scidfm_megatron.parallel import free_port

    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                     LOCAL_RANK="0").items():  # one process, in this one (no launcher start-up), env restored after
        monkeypatch.setenv(k, v)
    assert main(argv=["--config", str(RECIPES / "tiny_stage1.yaml"), *run_args(work, data)]) == 0
    assert "iter      2 | train loss" in capsys.readouterr().out
    ckpt = work / "ckpt"
    rc, out, err = entry(capsys, "tiny_stage2.yaml", *run_args(work, data, **{"checkpoint.init_from": ckpt,
                                                                               "checkpoint.save": work / "s2"}))
    assert rc == 0 and "configuration OK" in out, err

    from scidfm_megatron.convert.mcore_to_hf import convert_mcore_to_hf

    hf = tmp_path / "hf"
    convert_mcore_to_hf(ckpt, hf, dtype="fp32", progress=False)
    assert (hf / "tokenizer.model").read_bytes() == BASE_MODEL.read_bytes()
    gen = json.loads((hf / "generation_config.json").read_text())
    assert gen["eos_token_id"] == sp.eos_id()  # no <|eod|> piece: documents end with </s>

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)  # no remote code
    docs = sample_documents()
    assert len(docs) > 3000
    got = tok(docs, add_special_tokens=False)["input_ids"]
    want = sp.encode(docs)
    assert sum(g != w for g, w in zip(got, want, strict=False)) == 0
    assert tok.tokenize("The") == ["▁The"] and tok("The")["input_ids"] == [sp.bos_id()] + sp.encode("The")

    from scidfm_megatron.cli.evaluate import main as evaluate

    data_file = RECIPES.parent / "eval" / "data" / "multiple_choice.jsonl"
    capsys.readouterr()
    assert evaluate(["--model", str(hf), "--task", "sciq", "--data", str(data_file), "--limit", "2",
                     "--prompt-format", "raw", "--output", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())["results"]["sciq"]
    assert res["n"] == 2 and all(np.isfinite(s["loglik"]).all() for s in res["samples"])
    assert evaluate(["--model", str(hf), "--task", "sciq", "--data", str(data_file), "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert "--prompt-format chat needs the chat markers of a science tokenizer" in err and "Traceback" not in err


def test_data_made_with_another_tokenizer_stops_check_in_one_line(plain_data, science_tokenizer_dir, capsys,
                                                                    tmp_path):
    """A recipe naming another tokenizer than the data's: --check names the summary file and the fix. Data
    without a recorded fingerprint (older summaries) is checked by its largest id, with a logged line."""
    from scidfm_megatron.data.preprocess import preprocess

    work, data = plain_data
    science = science_tokenizer_dir / "tokenizer.model"
    fresh = {"checkpoint.save": tmp_path / "ckpt"}  # no checkpoint to resume: the data check is what is tested
    rc, out, err = entry(capsys, "tiny_stage1.yaml", *run_args(work, data, **{"data.tokenizer_model": science,
                                                                                "model.vocab_size": 32554}, **fresh))
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{data / 'papers_summary.json'} says {data / 'papers_text_document'} was made with tokenizer" in err
    assert "(plain, 32000 tokens)" in err and "(science, 32554 tokens)" in err
    assert f"re-run scidfm-preprocess with --tokenizer-model {science}" in err
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"junk\xff\x00")
    rc, out, err = entry(capsys, "tiny_stage1.yaml", *run_args(work, data, **{"data.tokenizer_model": junk},
                                                                 **fresh))
    assert rc == 2 and err.count("\n") == 1 and f"data.tokenizer_model: {junk} is not a SentencePiece model" in err

    # an older summary (no fingerprint, no largest id): the ids are read from the .bin
    old = tmp_path / "old"
    shutil.copytree(data, old)
    summary = json.loads((old / "papers_summary.json").read_text())
    for key in ("tokenizer", "largest_id"):
        del summary[key]
    (old / "papers_summary.json").write_text(json.dumps(summary))
    rc, out, err = entry(capsys, "tiny_stage1.yaml", *run_args(tmp_path, old, **{"data.tokenizer_model": science,
                                                                                   "model.vocab_size": 32554}))
    assert rc == 0, err
    assert "no tokenizer fingerprint recorded" in err and "checked by its largest token id only" in err

    # science data (molecule tokens above 32000), summary without fingerprint, recipe with the plain model
    mol = tmp_path / "mol"
    mol.mkdir()
    lines = open(SAMPLE / "molecules.jsonl", encoding="utf-8").readlines()[:50]
    (tmp_path / "m.jsonl").write_text("".join(lines))
    preprocess([str(tmp_path / "m.jsonl")], str(mol / "papers"), str(science), json_keys=["smiles"],
               spans={"smiles": "molecule"}, progress=False)
    (mol / "papers_smiles_document.bin").rename(mol / "papers_text_document.bin")
    (mol / "papers_smiles_document.idx").rename(mol / "papers_text_document.idx")
    (mol / "papers_summary.json").unlink()  # made by other tools: no summary at all
    rc, out, err = entry(capsys, "tiny_stage1.yaml", *run_args(tmp_path, mol))
    assert rc == 2 and "Traceback" not in err
    assert f"{mol / 'papers_text_document'}.bin holds token id" in err and "but model.vocab_size is 32000" in err


def test_hf_export_of_a_user_trained_model(tmp_path):
    """A BPE model trained with SentencePiece's defaults (nmt_nfkc, remove_extra_whitespaces, no byte
    fallback): the exported tokenizer.json gives SentencePiece's ids on every sample document; a unigram
    model is refused in one line before anything is written."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from scidfm_megatron.convert import tokenizer_files as tf

    lines = [json.loads(line)["text"] for line in open(SAMPLE / "papers.jsonl", encoding="utf-8")][:60]
    for kind in ("bpe", "unigram"):
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / kind),
                                       model_type=kind, vocab_size=400, minloglevel=2)
    tf.write(tf.inspect(tmp_path / "bpe.model"), tmp_path / "bpe_hf", model_max_length=64)
    tok = AutoTokenizer.from_pretrained(tmp_path / "bpe_hf")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "bpe.model"))
    docs = sample_documents()
    got = tok(docs, add_special_tokens=False)["input_ids"]
    assert sum(g != w for g, w in zip(got, sp.encode(docs), strict=False)) == 0
    with pytest.raises(tf.TokenizerError, match="unigram SentencePiece model has no Hugging Face tokenizer.json"):
        tf.write(tf.inspect(tmp_path / "unigram.model"), tmp_path / "uni_hf", model_max_length=64)
    assert not (tmp_path / "uni_hf" / "tokenizer.json").exists()
