"""One identity for a tokenizer file, so data, recipes and checkpoints can be tied to the tokenizer that made them.

``sha256`` is of the SentencePiece ``.model`` bytes; ``vocab_size`` is its piece count; ``kind`` is
``science`` (span vocabularies and chat markers) or ``plain``. Two fingerprints name the same tokenizer
when their sha256 are equal.
"""

from __future__ import annotations

import hashlib
import os
from typing import Mapping, TypedDict


class Fingerprint(TypedDict):
    """What identifies a tokenizer in data summaries and checkpoints: the model file's sha256, its vocabulary
    size and its kind (science or plain)."""
    sha256: str
    vocab_size: int
    kind: str


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(model_file: str | os.PathLike, tok=None) -> Fingerprint:
    """The fingerprint of a SentencePiece model file (science or plain); ``tok``: that file, already loaded."""
    if tok is None:
        from .plain import load_tokenizer

        tok = load_tokenizer(model_file)
    return Fingerprint(sha256=file_sha256(model_file), vocab_size=int(tok.vocab_size),
                       kind=getattr(tok, "kind", "science"))


def same_tokenizer(a: Mapping[str, object] | None, b: Mapping[str, object] | None) -> bool:
    """True when both fingerprints are known and name the same file contents."""
    return bool(a and b and a.get("sha256") and a.get("sha256") == b.get("sha256"))
