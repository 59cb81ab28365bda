"""The fast tokenization path (GigaToken, tokenizer/fast.py) gives SentencePiece's ids, document by document."""

import numpy as np
import pytest

from conftest import BASE_MODEL, SAMPLE, sample_documents

pytest.importorskip("gigatoken")

HOSTILE = [
    "<s>", "</s>", "<unk>", "<|eod|>", "[PAD]", "<|user|>", "<|assistant|>", "<|system|>", "text <s> more </s> end",
    'tokenizer("<s>" + sentence)', "a<unk>b", "<m>C <m>He <p>M <m>Cl", "x <|eod|> y", "[START_AMINO] half open",
    "ﬁnance ﬀ ① ｈｅｌｌｏ ＜ｓ＞ ＜／ｓ＞ ㎏ ½ ™ Å Å Ω Ω", "cafe\u0301 café", "\u3000ideographic\u3000space",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom", "emoji 😀 👩‍🔬 🧪🇺🇸 ✔︎", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝑥²",
    "混合 日本語 한국어 العربية हिन्दी",
    " ", "  ", "\t", "\n", "\r\n", " \t\n ", "   leading", "trailing   ", "a  b   c    d", "\n\n\nparagraphs\n\n",
    "\x01\x02 control \x7f\x1b[0m", "word " * 20000, "x" * 100000, "ab" * 30000 + "\n" + "🙂" * 5000,
    "C1=CC=CC=C1[Na+].[Cl-] MKTAYIAKQRQISFVKSHFSRQ*", "%s" % "".join(chr(c) for c in range(0x20, 0x250)),
]


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory):
    """A plain BPE model with an NFKC normaliser (SentencePiece's default) and byte fallback, and one
    GigaToken does not take (no byte fallback)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    text = d / "train.txt"
    text.write_text((SAMPLE / "papers.jsonl").read_text(encoding="utf-8")[:300_000], encoding="utf-8")
    out = {}
    for name, extra in (("nfkc", dict(byte_fallback=True)), ("nobytes", dict(byte_fallback=False))):
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(d / name), vocab_size=600, model_type="bpe",
                                       character_coverage=0.9995, minloglevel=2, **extra)
        out[name] = d / f"{name}.model"
    return out


_PAIRS: dict = {}


def _pair(model):
    """(SentencePiece, fast) tokenizers of ``model``, loaded once per module."""
    from scidfm_megatron.tokenizer.plain import load_tokenizer

    if str(model) not in _PAIRS:
        _PAIRS[str(model)] = load_tokenizer(model), load_tokenizer(model, fast=True)
    return _PAIRS[str(model)]


def _assert_same(ref, fast, docs):
    from scidfm_megatron.tokenizer.fast import encode_arrays

    assert fast.fast is not None, "the fast path was not taken: the test would compare SentencePiece with itself"
    want = [ref.encode(d) for d in docs]
    flat, lengths = encode_arrays(fast, docs)  # what scidfm-preprocess writes
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    got = [flat[offsets[k]:offsets[k + 1]].tolist() for k in range(len(docs))]
    bad = [d[:60] for d, w, g in zip(docs, want, got, strict=False) if g != w]
    assert not bad, f"fast ids differ from SentencePiece's on {len(bad)} documents, e.g. {bad[:3]}"
    assert docs[-len(HOSTILE):] == HOSTILE and fast.encode_batch(HOSTILE) == want[-len(HOSTILE):]
    assert [fast.encode(h) for h in HOSTILE[:20]] == [ref.encode(h) for h in HOSTILE[:20]]


def test_fast_ids_equal_sentencepiece_science_plain_and_nfkc(science_tokenizer_dir, trained_models):
    docs = sample_documents() + HOSTILE
    from scidfm_megatron.tokenizer.core import wrap_molecule, wrap_protein

    science_docs = docs + [wrap_protein(h) for h in HOSTILE[:12]] + [wrap_molecule(h) for h in HOSTILE[:12]] + \
        ["prose " + wrap_protein("MKV*") + " <s> " + wrap_molecule("C[13CH2+]Cl") + " tail"]
    _assert_same(*_pair(science_tokenizer_dir / "tokenizer.model"), science_docs + HOSTILE)
    _assert_same(*_pair(BASE_MODEL), docs)
    # the NFKC model: the sample corpus once more would add little; the hostile set is what normalises
    _assert_same(*_pair(trained_models["nfkc"]), docs[::7] + HOSTILE)


def test_the_guard_is_what_keeps_control_text_as_text(science_tokenizer_dir):
    """Forced onto every document, GigaToken turns ``<s>`` written in text into the control token (and the
    science tokenizer's ``<|eod|>`` into the EOD): SentencePiece keeps them as text; the guard sends such
    documents to SentencePiece."""
    from scidfm_megatron.tokenizer.fast import accelerate
    from scidfm_megatron.tokenizer.plain import load_tokenizer

    for model, text in ((BASE_MODEL, 'tokenizer("<s>" + sentence)'),
                        (science_tokenizer_dir / "tokenizer.model", "the end <|eod|> marker")):
        ref, guarded = _pair(model)
        forced = accelerate(load_tokenizer(model), guard=False)
        assert forced.encode(text) != ref.encode(text), "GigaToken now agrees: the guard may be unneeded"
        assert guarded.encode(text) == ref.encode(text)


def test_models_it_cannot_promise_fall_back_once(trained_models, capsys, monkeypatch):
    from scidfm_megatron.tokenizer.plain import load_tokenizer

    ref, fast = _pair(trained_models["nobytes"])
    assert fast.fast is None and fast.encode("hello world") == ref.encode("hello world")
    assert load_tokenizer(trained_models["nobytes"], fast=True).fast is None
    err = capsys.readouterr().err
    assert err.count("cannot promise SentencePiece's ids") == 1 and "byte_fallback" in err
    monkeypatch.setenv("SCIDFM_FAST_TOKENIZER", "0")
    assert load_tokenizer(BASE_MODEL, fast=True).fast is None
