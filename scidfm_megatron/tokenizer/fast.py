"""Exact fast tokenization: GigaToken (``pip install scidfm-megatron[fast]``) with SentencePiece's ids,
guarded per model (probe set) and per document (text of non-normal pieces goes to SentencePiece);
``SCIDFM_FAST_TOKENIZER=0`` turns it off (docs/data.md, "Fast tokenization with SentencePiece's ids")."""

from __future__ import annotations

import os
import re
import sys
import unicodedata
from typing import Optional

import numpy as np

_SAID: set = set()

PROBES = [
    "<s>", "</s>", "<unk>", "<|eod|>", "a <s> b </s> c", "x<unk>y", " ", "  ", "\t", "\n", " \n\t ",
    "   leading and trailing   ", "ﬁ ﬀ Ⅻ ① ｈｅｌｌｏ ＜ｓ＞ ㎏ ½ ™ Å Å", "e\u0301 \u00e9 \u212b \u2126",
    "emoji 😀👩‍🔬🧪 and flags 🇺🇸", "\u3000full width\u3000space", "zero\u200bwidth\u200djoiner",
    "混合 text 日本語 한국어 العربية", "\x01\x1f control \x7f chars", "tabs\tand\r\nlines\n\n\n",
    "C1=CC=CC=C1 [Na+].[Cl-] MKTAYIAKQR", "x" * 3000 + " " + "ab " * 500,
]


def _say_once(key: str, message: str) -> None:
    if key not in _SAID:
        _SAID.add(key)
        print(message, file=sys.stderr)


def enabled() -> bool:
    return os.environ.get("SCIDFM_FAST_TOKENIZER", "1").lower() not in ("0", "false", "no", "off")


class FastBPE:
    """GigaToken for one SentencePiece model proto, falling back to ``sp`` where equality is not promised.

    ``guard=False`` skips the per-document check (a test shows what it catches); never use it for data."""

    def __init__(self, sp, gt, risky: list[str], normalizes: bool, guard: bool = True):
        self.sp, self.gt = sp, gt
        self.normalizes = normalizes
        self.guard_enabled = guard
        self.risky = sorted(set(risky), key=len, reverse=True)
        # One pattern per first character: each then scans for a literal, which re does fast.
        by_first: dict = {}
        for r in self.risky:
            by_first.setdefault(r[0], []).append(r[1:])
        self._risky_res = [re.compile(re.escape(c) + "(?:" + "|".join(map(re.escape, rest)) + ")")
                           for c, rest in sorted(by_first.items())]
        self._risky_re = self._risky_res[0] if self._risky_res else None

    # --------------------------------------------------------------- guard
    def needs_sentencepiece(self, text: str) -> bool:
        """True when ``text`` must be encoded by SentencePiece (it holds a non-normal piece's text)."""
        if not self.guard_enabled or self._risky_re is None:
            return False
        if self._holds_risky(text):
            return True
        return self.normalizes and not text.isascii() and self._holds_risky(unicodedata.normalize("NFKC", text))

    def _holds_risky(self, text: str) -> bool:
        for pattern in self._risky_res:
            if pattern.search(text) is not None:
                return True
        return False

    # --------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        if self.needs_sentencepiece(text):
            return self.sp.encode(text)
        return self.gt.encode(text).tolist()

    def encode_arrays(self, texts: list[str], parallel: Optional[bool] = None) -> tuple[np.ndarray, np.ndarray]:
        """(flat ids as uint32, per-text lengths as int64) of ``texts``, SentencePiece's ids."""
        slow = [k for k, t in enumerate(texts) if self.needs_sentencepiece(t)] if self._risky_re is not None \
            and self.guard_enabled else []
        if not slow:
            return _flat(self.gt.encode_batch(texts, parallel=parallel))
        slow_set = set(slow)
        fast_idx = [k for k in range(len(texts)) if k not in slow_set]
        flat, lengths = _flat(self.gt.encode_batch([texts[k] for k in fast_idx], parallel=parallel))
        per_doc: list = [None] * len(texts)
        offs = np.concatenate([[0], np.cumsum(lengths)])
        for j, k in enumerate(fast_idx):
            per_doc[k] = flat[offs[j]:offs[j + 1]]
        for k in slow:
            per_doc[k] = np.asarray(self.sp.encode(texts[k]), dtype=np.uint32)
        out_len = np.fromiter((len(a) for a in per_doc), dtype=np.int64, count=len(per_doc))
        return (np.concatenate(per_doc) if per_doc else np.zeros(0, np.uint32)), out_len

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        flat, lengths = self.encode_arrays(texts)
        offs = np.concatenate([[0], np.cumsum(lengths)])
        ids = flat.tolist()
        return [ids[offs[k]:offs[k + 1]] for k in range(len(texts))]


def _flat(arr) -> tuple[np.ndarray, np.ndarray]:
    layout = arr.layout
    offsets = np.asarray(layout.offsets)
    data = np.asarray(layout.content.data)
    return data[offsets[0]:offsets[-1]], np.diff(offsets)


def risky_surfaces(proto) -> list[str]:
    """The text of every piece SentencePiece never produces from plain text or matches differently
    (control, unknown, unused, user-defined), as it appears in a document."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    T = pb.ModelProto.SentencePiece.Type
    keep = (T.NORMAL, T.BYTE)
    out = []
    for p in proto.pieces:
        if p.type in keep:
            continue
        s = p.piece.replace("\u2581", " ")
        if s:
            out.append(s)
            if s.strip() and s.strip() != s:
                out.append(s.strip())
    return out


_JSON: dict = {}  # sha256 of a model proto -> GigaToken's tokenizer.json for it (forked workers inherit it)


def tokenizer_json(proto_bytes: bytes, dummy_prefix: bool = True) -> str:
    """GigaToken's conversion of a SentencePiece model (cached); ``dummy_prefix=False`` drops the
    leading-space normaliser (the science tokenizer's continuation encoder)."""
    import hashlib
    import json

    from gigatoken._load.sentencepiece import sentencepiece_to_tokenizer_json

    key = (hashlib.sha256(proto_bytes).hexdigest(), dummy_prefix)
    if key not in _JSON:
        if dummy_prefix:
            _JSON[key] = sentencepiece_to_tokenizer_json(proto_bytes)
        else:
            data = json.loads(tokenizer_json(proto_bytes))
            norm = data["normalizer"]["normalizers"]
            data["normalizer"]["normalizers"] = [n for n in norm if n.get("type") != "Prepend"]
            _JSON[key] = json.dumps(data, ensure_ascii=False)
    return _JSON[key]


def fast_bpe(proto_bytes: bytes, sp, what: str, guard: bool = True, dummy_prefix: bool = True) -> Optional[FastBPE]:
    """A guarded GigaToken encoder equal to ``sp`` (a SentencePieceProcessor of ``proto_bytes``, with its
    dummy prefix off when ``dummy_prefix`` is False), or None (printed once per model) when gigatoken is
    missing, switched off, or cannot promise equal ids."""
    if not enabled():
        return None
    try:
        import gigatoken
    except ImportError:
        _say_once("missing", "scidfm: gigatoken not installed; tokenizing with SentencePiece "
                             "(pip install 'scidfm-megatron[fast]' for the fast path)")
        return None
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(proto_bytes)
    try:
        gt = gigatoken.Tokenizer.from_json(tokenizer_json(proto_bytes, dummy_prefix))
    except ValueError as exc:
        _say_once(f"unsupported:{what}", f"scidfm: {what}: fast tokenizer cannot promise SentencePiece's ids "
                                         f"({exc}); using SentencePiece")
        return None
    normalizes = bool(proto.normalizer_spec.precompiled_charsmap)
    fast = FastBPE(sp, gt, risky_surfaces(proto), normalizes, guard=guard)
    if not guard:  # forced (tests only): GigaToken on every document, no probes either
        return fast
    for probe in PROBES:
        if fast.encode(probe) != sp.encode(probe):
            _say_once(f"probe:{what}", f"scidfm: {what}: fast tokenizer differs from SentencePiece on {probe[:40]!r} "
                                       f"(normaliser {proto.normalizer_spec.name!r}); using SentencePiece")
            return None
    return fast


# ------------------------------------------------------------------------------ tokenizers
def accelerate_plain(tok, guard: bool = True):
    """Give a :class:`~.plain.PlainSentencePieceTokenizer` the fast path (in place); returns it."""
    with open(tok.model_file, "rb") as f:
        proto_bytes = f.read()
    tok.fast = fast_bpe(proto_bytes, tok.sp, tok.model_file, guard=guard)
    return tok


def accelerate_science(tok, guard: bool = True):
    """Give a :class:`~.core.ScienceTokenizer` fast base-BPE pieces and table-driven spans (in place)."""
    first = fast_bpe(tok._proto_bytes, tok.sp, tok.model_file, guard=guard)
    if first is None:
        tok.fast = None
    else:
        cont = fast_bpe(tok._proto_bytes, tok.sp_cont, tok.model_file + " (continuation)", guard=guard,
                        dummy_prefix=False)
        tok.fast = first if cont is not None else None
        if cont is not None:
            tok._bpe_first, tok._bpe_cont = first.encode, cont.encode
    # Protein spans: one residue table lookup per character (numpy), the slow loop only for odd characters.
    lut = np.full(128, -1, dtype=np.int64)
    for ch, i in tok.prot_vocab.items():
        if len(ch) == 1 and ord(ch) < 128:
            lut[ord(ch)] = i
    slow_protein = tok._protein
    runs: dict = {}  # short non-residue runs ('*', 'X1') and their continuation BPE ids

    def run_ids(run: str) -> list[int]:
        ids = runs.get(run)
        if ids is None:
            ids = tok._bpe(run, first=False)
            if len(run) <= 4 and len(runs) < 4096:
                runs[run] = ids
        return ids

    def protein(seq: str) -> list[int]:
        if not seq.isascii():
            return slow_protein(seq)
        ids = lut[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)]
        odd = ids < 0
        if not odd.any():
            return ids.tolist()
        # Runs of non-residue characters (a stop '*', digits, ...) go through the base BPE, as in core.
        edges = np.flatnonzero(np.diff(np.concatenate([[False], odd, [False]]).astype(np.int8)))
        out: list[int] = []
        pos = 0
        for a, b in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=False):
            out.extend(ids[pos:a].tolist())
            out.extend(run_ids(seq[a:b]))
            pos = b
        out.extend(ids[pos:].tolist())
        return out

    mol = tok.mol_vocab
    slow_molecule = tok._molecule
    from .core import split_smiles

    def molecule(smiles: str) -> list[int]:
        try:
            return [mol[lex] for lex in split_smiles(smiles)]
        except KeyError:
            return slow_molecule(smiles)

    tok._protein, tok._molecule = protein, molecule
    return tok


def accelerate(tok, guard: bool = True):
    """The fast path for either tokenizer kind (in place); returns ``tok``."""
    return accelerate_plain(tok, guard) if getattr(tok, "kind", None) == "plain" else accelerate_science(tok, guard)


def encode_arrays(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids as uint32, lengths as int64) of documents: ``tok.encode`` of each, without Python lists
    for the span-free documents when the fast path is on."""
    fast = getattr(tok, "fast", None)
    if fast is None:
        encoded = tok.encode_batch(texts) if texts else []
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter((i for ids in encoded for i in ids), dtype=np.uint32, count=int(lengths.sum()))
        return flat, lengths
    if getattr(tok, "kind", None) == "plain":
        return fast.encode_arrays(texts)
    spans = [k for k, t in enumerate(texts) if "[START_" in t or "[END_" in t]
    if not spans:
        return fast.encode_arrays(texts)
    span_set = set(spans)
    prose_idx = [k for k in range(len(texts)) if k not in span_set]
    flat, lengths = fast.encode_arrays([texts[k] for k in prose_idx])
    offs = np.concatenate([[0], np.cumsum(lengths)])
    per_doc: list = [None] * len(texts)
    for j, k in enumerate(prose_idx):
        per_doc[k] = flat[offs[j]:offs[j + 1]]
    for k in spans:
        per_doc[k] = np.asarray(tok.encode(texts[k]), dtype=np.uint32)
    out_len = np.fromiter((len(a) for a in per_doc), dtype=np.int64, count=len(per_doc))
    return (np.concatenate(per_doc) if per_doc else np.zeros(0, np.uint32)), out_len


def prepare(tok) -> None:
    """Convert ``tok``'s model for GigaToken once, before worker processes fork (they inherit it, and
    the record of what was already said, so a fallback is reported once, not once per worker)."""
    if not enabled():
        return
    try:
        import gigatoken  # noqa: F401
    except ImportError:
        fast_bpe(b"", None, tok.model_file)  # says so once
        return
    try:
        proto_bytes = getattr(tok, "_proto_bytes", None)
        if proto_bytes is None:
            with open(tok.model_file, "rb") as f:
                proto_bytes = f.read()
        tokenizer_json(proto_bytes)
        if getattr(tok, "kind", None) != "plain":
            tokenizer_json(proto_bytes, dummy_prefix=False)
    except ValueError as exc:
        _say_once(f"unsupported:{tok.model_file}", f"scidfm: {tok.model_file}: fast tokenizer cannot promise "
                                                   f"SentencePiece's ids ({exc}); using SentencePiece")
