"""Science tokenizer (issue 3, acceptance 1; issue 5, acceptance 3 for the Hugging Face side)."""

import json

import pytest
import sentencepiece as spm

from conftest import BASE_MODEL, SAMPLE, sample_documents
from scidfm_megatron.tokenizer import MOL_END, MOL_START, PROT_END, PROT_START, ScienceTokenizer, chat_segments
from scidfm_megatron.tokenizer.core import spell_bracket_atom, split_smiles


def test_round_trip_every_sample_document(science_tokenizer):
    docs = sample_documents()
    assert len(docs) > 3000
    for d in docs:
        assert science_tokenizer.decode(science_tokenizer.encode(d)) == d


@pytest.mark.parametrize("text", [
    "", " ", "  two leading spaces", "\nnewline first", "trailing space ", "tabs\tand\r\nCRLF",
    "Unicode: ünïcödé 日本語 😀 — α-helix", "[START_I_SMILES]CCO[END_I_SMILES]", " [START_AMINO]MK[END_AMINO] ",
    "unterminated [START_I_SMILES]C1CC", "stray [END_I_SMILES] marker", "[START_I_SMILES]not smiles ü 日[END_I_SMILES]",
    "[START_AMINO]mkv*-XB[END_AMINO]", "[START_I_SMILES][START_AMINO]nested[END_AMINO][END_I_SMILES]",
    "prose that mentions C, Cl, Br, Zn and the letters MKVL", "<|user|> <|eod|> [PAD] <s> </s> in a document",
])
def test_round_trip_edge_cases(science_tokenizer, text):
    assert science_tokenizer.decode(science_tokenizer.encode(text)) == text


def _span_tokens(tok, ids, start_marker):
    start, end = tok.special_ids[start_marker], tok.special_ids[MOL_END if start_marker == MOL_START else PROT_END]
    i = ids.index(start)
    return ids[i + 1:ids.index(end)]


def test_every_atom_of_every_sample_smiles_is_one_token(science_tokenizer):
    """Independent check with RDKit: the number of atom tokens in each molecule span equals RDKit's atom
    count, and every atom token decodes to exactly one atom (element, aromatic atom or bracket atom)."""
    from rdkit import Chem

    from scidfm_megatron.tokenizer.build import AROMATIC, ELEMENTS

    atoms = set(ELEMENTS) | set(AROMATIC)
    tok = science_tokenizer
    n = 0
    for line in open(SAMPLE / "molecules.jsonl"):
        smi = json.loads(line)["smiles"]
        span = _span_tokens(tok, tok.encode(f"{MOL_START}{smi}{MOL_END}"), MOL_START)
        surfaces = [tok.decode([i]) for i in span]
        assert all(tok.token_kind(i) == "molecule" for i in span), smi
        atom_tokens = [s for s in surfaces if s in atoms or (s.startswith("[") and s.endswith("]") and len(s) > 2)]
        assert len(atom_tokens) == Chem.MolFromSmiles(smi).GetNumAtoms(), (smi, surfaces)
        assert "".join(surfaces) == smi
        n += 1
    assert n == 2000


def test_paper_example_and_unknown_bracket_atoms(science_tokenizer):
    tok = science_tokenizer
    span = _span_tokens(tok, tok.encode(f"{MOL_START}C(C(=O)O)N{MOL_END}"), MOL_START)
    assert [tok.decode([i]) for i in span] == ["C", "(", "C", "(", "=", "O", ")", "O", ")", "N"]
    # A bracket atom absent from the vocabulary is spelled with molecule tokens, its element whole.
    assert "[15NH3+]" not in tok.mol_vocab
    span = _span_tokens(tok, tok.encode(f"{MOL_START}[15NH3+]{MOL_END}"), MOL_START)
    assert [tok.decode([i]) for i in span] == ["[", "1", "5", "N", "H", "3", "+", "]"]
    assert spell_bracket_atom("[C@@H]") == ["[", "C", "@@", "H", "]"]
    assert split_smiles("Clc1ccccc1Br") == ["Cl", "c", "1", "c", "c", "c", "c", "c", "1", "Br"]


def test_one_token_per_residue(science_tokenizer):
    tok = science_tokenizer
    for line in open(SAMPLE / "proteins.jsonl"):
        seq = json.loads(line)["sequence"]
        span = _span_tokens(tok, tok.encode(f"{PROT_START}{seq}{PROT_END}"), PROT_START)
        letters = [c for c in seq if c.isupper()]
        assert sum(tok.token_kind(i) == "protein" for i in span) == len(letters)
        assert [tok.decode([i]) for i in span if tok.token_kind(i) == "protein"] == letters


def test_outside_spans_is_exactly_the_base_bpe(science_tokenizer):
    base = spm.SentencePieceProcessor(model_file=str(BASE_MODEL))
    for line in open(SAMPLE / "papers.jsonl"):
        text = json.loads(line)["text"]
        if MOL_START not in text:
            assert science_tokenizer.encode(text) == base.encode(text)
    ids = science_tokenizer.encode("Carbon (C) and chlorine (Cl) in MKVL.")
    assert all(science_tokenizer.token_kind(i) == "text" for i in ids)


def test_specials_only_when_allowed(science_tokenizer):
    tok = science_tokenizer
    text = "<|user|>hi<|assistant|>"
    assert tok.special_ids["<|user|>"] not in tok.encode(text)
    ids = tok.encode(text, allow_special=True)
    assert ids[0] == tok.special_ids["<|user|>"] and ids[-1] == tok.special_ids["<|assistant|>"]
    assert tok.decode(ids) == text and tok.decode(ids, skip_special=True) == "hi"
    assert tok.decode(tok.encode("x", bos=True, eos=True)) == "<s>x</s>"


def test_build_refuses_bad_bases(tmp_path, science_tokenizer_dir):
    from scidfm_megatron.tokenizer.build import build_tokenizer

    with pytest.raises(ValueError, match="already contains"):
        build_tokenizer(science_tokenizer_dir / "tokenizer.model", tmp_path / "x")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\xff\x00not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        build_tokenizer(junk, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(ValueError, match="not an extended science tokenizer"):
        ScienceTokenizer(BASE_MODEL)


def test_inventory_file_documents_ids(science_tokenizer_dir, science_tokenizer):
    inv = json.loads((science_tokenizer_dir / "science_tokens.json").read_text())
    assert inv["vocab_size"] == science_tokenizer.vocab_size and inv["base_vocab_size"] == 32000
    assert inv["span_markers"] == {"[START_I_SMILES]": 32000, "[END_I_SMILES]": 32001, "[START_AMINO]": 32002,
                                   "[END_AMINO]": 32003}
    assert list(inv["specials"]) == ["[PAD]", "<|eod|>", "<|system|>", "<|user|>", "<|assistant|>"]
    assert max(inv["specials"].values()) == inv["vocab_size"] - 1  # specials last, as in the release


def test_hugging_face_tokenizer_gives_the_same_ids(science_tokenizer_dir, science_tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(science_tokenizer_dir), trust_remote_code=True)
    tok = science_tokenizer
    for d in sample_documents():
        ids = hf(d)["input_ids"]
        assert ids == [tok.bos_id] + tok.encode(d, allow_special=True)
        assert hf.decode(ids) == "<s>" + d  # lossless; specials in the text come back as themselves
    msgs = json.loads(open(SAMPLE / "instructions.jsonl").readline())["messages"]
    rendered = hf.apply_chat_template(msgs, tokenize=False)
    assert rendered == "".join(t for t, _ in chat_segments(msgs))
    assert hf.apply_chat_template(msgs, tokenize=True)["input_ids"] == tok.encode(rendered, allow_special=True)
    assert hf.pad_token_id == tok.pad_id and hf.eos_token_id == tok.eos_id and len(hf) == tok.vocab_size


def test_build_refuses_a_base_that_loses_text_with_the_numbers(tmp_path, capsys):
    """A SentencePiece model trained with the trainer's default normalisation (nmt_nfkc,
    remove_extra_whitespaces) drops the space before a span: refused, one line with how many of the
    probe texts fail and an example, nothing written; --allow-lossy-base builds it and prints the numbers.
    The base model of this repository passes the same check (conftest's science_tokenizer_dir)."""
    import sentencepiece as spm

    from scidfm_megatron.cli.build_tokenizer import main
    from scidfm_megatron.tokenizer.build import ROUND_TRIP_PROBES

    lines = [json.loads(line)["text"] for line in open(SAMPLE / "papers.jsonl", encoding="utf-8")][:60]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "default"),
                                   model_type="bpe", vocab_size=400, minloglevel=2)
    probe_file = tmp_path / "probe.jsonl"
    probe_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[:5]) + "not json\n")
    n = len(ROUND_TRIP_PROBES) + 5
    base, out = tmp_path / "default.model", tmp_path / "tok"
    capsys.readouterr()
    assert main(["--base-model", str(base), "--output-dir", str(out), "--probe-from", f"{probe_file}:text"]) == 2
    err = capsys.readouterr().err
    assert f"skipped 1 unreadable line(s), e.g. {probe_file}:6" in err
    refusal = err.splitlines()[-1]
    assert f"{base} (BPE, normaliser nmt_nfkc, remove_extra_whitespaces, no byte fallback) loses text: " in refusal
    assert f" of {n} probe texts do not decode to themselves (e.g. 'chloroform [START_I_SMILES]" in refusal
    assert "-> 'chloroform[START_I_SMILES]" in refusal and "--allow-lossy-base" in refusal
    assert not out.exists() and not list(tmp_path.glob("tok.*"))
    assert main(["--base-model", str(base), "--output-dir", str(out), "--allow-lossy-base"]) == 0
    err = capsys.readouterr().err
    k = len(ROUND_TRIP_PROBES)
    assert f"{k} of {k} probe texts do not decode to themselves" in err  # every built-in probe
    assert (out / "tokenizer.model").exists()
