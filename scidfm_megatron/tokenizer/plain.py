"""Any SentencePiece model, as Megatron-LM's ``GPTSentencePieceTokenizer`` uses it.

General-domain sources (SlimPajama, Wikipedia, code) and users not training SciDFM's vocabulary
preprocess with the plain model their base LLM ships (``--tokenizer-model tokenizer.model``, the flag and
file Megatron-LM's ``tools/preprocess_data.py`` takes). The ids are Megatron-LM's: a document's ids are
``SentencePieceProcessor.encode_as_ids(text)`` (no BOS), and the end-of-document id is ``</s>``
(``eos_id()``) unless the model has an ``<|eod|>`` piece, which then is the EOD. Span wrapping and chat
markers need the science tokenizer (:mod:`.core`): SFT data and chat prompts are refused with a plain
model. For evaluation it takes the science tokenizer's ``encode``/``decode`` keywords (``bos``,
``continuation``; ``allow_special`` and ``skip_special`` concern markers a plain model does not have).
"""

from __future__ import annotations

import os


class PlainSentencePieceTokenizer:
    """Any SentencePiece model with Megatron-LM's ids (no BOS, EOD ``</s>`` unless the model has ``<|eod|>``), so
    general corpora need no science vocabulary."""
    kind = "plain"

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        self.model_file = str(model_file)
        if not os.path.exists(self.model_file):
            raise OSError(f"{self.model_file}: no such file")
        self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto.FromString(self.sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False  # text that continues a document: no dummy "▁"
        self.sp_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.vocab_size = self.sp.get_piece_size()
        eod = self.sp.piece_to_id("<|eod|>")
        self.eod_id = eod if eod != self.sp.unk_id() else self.sp.eos_id()
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.num_threads = -1
        # the only special a plain model can have that the trainer or evaluation uses by name
        self.special_ids = {"<|eod|>": eod} if eod != self.sp.unk_id() else {}
        self.fast = None  # tokenizer/fast.py: GigaToken with the same ids

    def encode(self, text: str, *, allow_special: bool = False, bos: bool = False, eos: bool = False,
               continuation: bool = False) -> list[int]:
        if continuation:
            ids = self.sp_cont.encode_as_ids(text)
        else:
            ids = self.fast.encode(text) if self.fast is not None else self.sp.encode_as_ids(text)
        return ([self.bos_id] if bos and self.bos_id >= 0 else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.fast is not None:
            return self.fast.encode_batch(list(texts))
        return self.sp.encode(list(texts), num_threads=self.num_threads)

    def decode(self, ids, *, skip_special: bool = False) -> str:
        return self.sp.decode_ids([int(i) for i in ids])


def load_tokenizer(model_file: str | os.PathLike, fast: bool = False):
    """The science tokenizer when ``model_file`` is one, else the plain SentencePiece model.
    ``fast``: GigaToken where it gives SentencePiece's ids (tokenizer/fast.py), else SentencePiece."""
    from .core import NotScienceTokenizer, ScienceTokenizer

    tok: ScienceTokenizer | PlainSentencePieceTokenizer
    try:
        tok = ScienceTokenizer(model_file)
    except NotScienceTokenizer:
        tok = PlainSentencePieceTokenizer(model_file)
    if fast:
        from .fast import accelerate

        accelerate(tok)
    return tok
