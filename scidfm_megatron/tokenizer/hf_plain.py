"""A Hugging Face ``tokenizer.json`` that gives a plain SentencePiece model's ids exactly, built from the
model's own proto because transformers' generic conversion differs from SentencePiece; :func:`check_ids`
encodes probe texts both ways before an export is written (docs/conversion.md, "What comes out")."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PlainExportError  # re-export: defined in scidfm_megatron/errors.py

# SentencePiece piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Text that exercises what differs between tokenizer pipelines: leading/trailing/inner whitespace runs,
# tabs and newlines, code indentation, digits, punctuation, non-ASCII, characters no vocabulary has
# (byte fallback or unk), and the control pieces' strings as plain text.
PROBES = (
    "The", " leading space", "  two leading spaces", "trailing space ", "a  b   c    d", "\tTabbed\tline\n",
    "line one\nline two\n\n  indented", "def f(x):\n    return x  # four spaces\n        eight",
    "function Res = dfm(X,Spec)\n%DFM()    Runs the model", "pH 7.4, 37 °C, 1.5e-3 mol/L, ΔG = −12 kJ",
    "Caffeine (C8H10N4O2) blocks adenosine receptors.", "chloroform [START_I_SMILES]CC(=O)O[END_I_SMILES] ok",
    "<s> and </s> and <unk> are text here", "naïve café Straße résumé", "質量分析 タンパク質 단백질",
    "emoji 🧪🧬 and ∑∫√ symbols", "x" * 40, "    ", " ", "",
)


def _proto(model_file):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def _merges(proto) -> list[tuple[str, str]]:
    """BPE merges from piece scores: every split of a normal piece into two normal pieces, ranked by the
    piece's score (high first), then longer left part, then longer right part."""
    normal = {p.piece: p.score for p in proto.pieces if p.type == NORMAL}
    ranked = []
    for piece, score in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-score, -len(left), -len(right), left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build(model_file):
    """The ``tokenizers.Tokenizer`` equivalent of a plain SentencePiece ``model_file``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    proto = _proto(model_file)
    ns, ts = proto.normalizer_spec, proto.trainer_spec
    if ts.treat_whitespace_as_suffix or not ns.escape_whitespaces:
        raise PlainExportError(f"{model_file}: treat_whitespace_as_suffix / escape_whitespaces=false SentencePiece "
                               f"models have no Hugging Face tokenizer.json equivalent here")
    pieces = list(proto.pieces)
    unk_piece = pieces[ts.unk_id].piece if 0 <= ts.unk_id < len(pieces) else None
    if ts.model_type == 2:  # BPE
        model = BPE(vocab={p.piece: i for i, p in enumerate(pieces)}, merges=_merges(proto), unk_token=unk_piece,
                    fuse_unk=True, byte_fallback=ts.byte_fallback, dropout=None)
    else:
        kind = {1: "unigram", 3: "word", 4: "char"}.get(ts.model_type, str(ts.model_type))
        raise PlainExportError(f"{model_file}: a {kind} SentencePiece model has no Hugging Face tokenizer.json with "
                               f"SentencePiece's ids here (only BPE); export with --tokenizer none and ship "
                               f"tokenizer.model with the model")
    tok = Tokenizer(model)
    norm: list[normalizers.Normalizer] = []
    if ns.precompiled_charsmap:
        norm.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norm += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex("^ | $"), "")]
    if ns.add_dummy_prefix:
        norm.append(normalizers.Prepend("▁"))
    norm.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norm)
    dec: list[decoders.Decoder] = [decoders.Replace("▁", " ")]
    if ts.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)
    tok.add_tokens([AddedToken(p.piece, normalized=False, special=p.type in (CONTROL, UNKNOWN))
                    for p in pieces if p.type in (CONTROL, UNKNOWN, USER_DEFINED)])
    if 0 <= ts.bos_id < len(pieces):
        bos = pieces[ts.bos_id].piece
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, ts.bos_id)])
    return tok


def tokenizer_config(model_file, model_max_length: int) -> dict:
    """``tokenizer_config.json`` for :func:`build`'s tokenizer: the generic fast class, SentencePiece's
    special pieces, control strings in text tokenized as text."""
    proto = _proto(model_file)
    ts, pieces = proto.trainer_spec, proto.pieces
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
           "add_bos_token": 0 <= ts.bos_id < len(pieces), "add_eos_token": False,
           "clean_up_tokenization_spaces": False, "split_special_tokens": True}
    for key, i in (("bos_token", ts.bos_id), ("eos_token", ts.eos_id), ("unk_token", ts.unk_id),
                   ("pad_token", ts.pad_id)):
        if 0 <= i < len(pieces):
            cfg[key] = pieces[i].piece
    return cfg


def write(dst, model_file, model_max_length: int) -> list[str]:
    """``tokenizer.json`` + ``tokenizer_config.json`` into ``dst`` (which already holds tokenizer.model),
    after :func:`check_ids` passed on the probes. Returns notes for the console (none at present)."""
    tok = build(model_file)
    check_ids(tok, model_file)
    notes: list[str] = []
    dst = Path(dst)
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(model_file, model_max_length), indent=2)
                                               + "\n")
    return notes


def mismatches(tok, model_file, texts) -> list[str]:
    """The texts whose ids differ between ``tok`` (no special tokens added) and SentencePiece."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    texts = list(texts)
    tok.encode_special_tokens = True
    got = tok.encode_batch(texts, add_special_tokens=False)
    return [t for t, g, want in zip(texts, got, sp.encode(texts), strict=False) if g.ids != want]


def check_ids(tok, model_file, texts=PROBES) -> None:
    bad = mismatches(tok, model_file, texts)
    if bad:
        raise PlainExportError(f"{model_file}: the Hugging Face tokenizer.json built for it gives other ids than "
                               f"SentencePiece on {len(bad)} of {len(texts)} probe texts (e.g. {bad[0]!r}); not "
                               f"written. Export with --tokenizer none and ship tokenizer.model with the model")
