"""SciDFM science tokenizer: a Llama-style SentencePiece BPE plus molecule and protein spans (docs/data.md,
"Science tokenizer": the text model and the vocabulary layout).

Standalone on purpose (standard library + ``sentencepiece``; ``transformers`` only for the optional Hugging
Face class at the bottom): a Hugging Face export ships this file verbatim as its tokenizer code, and it
reads everything it needs from one extended ``tokenizer.model``."""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Iterable, Optional

MOL_START, MOL_END = "[START_I_SMILES]", "[END_I_SMILES]"
PROT_START, PROT_END = "[START_AMINO]", "[END_AMINO]"
SPAN_MARKERS = (MOL_START, MOL_END, PROT_START, PROT_END)
PAD, EOD, SYSTEM, USER, ASSISTANT = "[PAD]", "<|eod|>", "<|system|>", "<|user|>", "<|assistant|>"
SPECIALS = (PAD, EOD, SYSTEM, USER, ASSISTANT)
MOL_PREFIX, PROT_PREFIX = "<m>", "<p>"

# SMILES lexemes (after Schwaller et al., Molecular Transformer), with a catch-all last so that any
# character sequence lexes completely (non-SMILES text inside a span still round-trips).
SMILES_LEXER = re.compile(
    r"\[[^\[\]]*\]|Br|Cl|[BCNOPSFI]|[bcnosp]|\*|%\d\d|\d|[=#\-+\\/:~@?><$.()]|.", re.S)
# Parts of a bracket atom: [isotope] element [chirality] [H count] [charge] [:class]
BRACKET_PARTS = re.compile(
    r"^\[(\d*)((?:[A-Z][a-z]?)|(?:se|as|te|[bcnosp])|\*)(@@|@(?:TH|AL|SP|TB|OH)\d+|@)?(H\d*)?"
    r"((?:\+\d*|-\d*)|\+\++|--+)?(:\d+)?\]$")
BOS_TEXT, EOS_TEXT = "<s>", "</s>"
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPAN_MARKERS + SPECIALS + (BOS_TEXT, EOS_TEXT)))
_SPAN_RE = re.compile("|".join(re.escape(s) for s in SPAN_MARKERS))


def split_smiles(smiles: str) -> list[str]:
    """SMILES -> lexemes; ``"".join(split_smiles(s)) == s`` for any string."""
    return SMILES_LEXER.findall(smiles)


def spell_bracket_atom(atom: str) -> Optional[list[str]]:
    """``[13CH2+]`` -> ``['[', '1', '3', 'C', 'H', '2', '+', ']']`` (element kept whole); None if malformed."""
    m = BRACKET_PARTS.match(atom)
    if not m:
        return None
    isotope, element, chirality, hcount, charge, klass = m.groups()
    out = ["["] + list(isotope)
    out.append(element)
    if chirality:
        out += [chirality] if chirality in ("@", "@@") else list(chirality)
    if hcount:
        out += ["H"] + list(hcount[1:])
    if charge:
        out += list(charge)
    if klass:
        out += list(klass)
    return out + ["]"]


class NotScienceTokenizer(ValueError):
    """A valid SentencePiece model without the science vocabulary (a plain Llama-style tokenizer).

    Defined here, not in scidfm_megatron/errors.py: this file ships alone in every exported HF folder
    (tokenization_scidfm.py), so it imports nothing of the package. Internal: plain.py catches it."""


class ScienceTokenizer:
    """Encode/decode with molecule and protein spans. Load with ``ScienceTokenizer(path_to_model)``."""

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        self.model_file = str(model_file)
        proto = pb.ModelProto()
        with open(self.model_file, "rb") as f:
            proto.ParseFromString(f.read())
        self._proto_bytes = proto.SerializeToString()
        self.sp = spm.SentencePieceProcessor(model_proto=self._proto_bytes)
        # Text after a span continues the document: encode it without the dummy "▁" prefix.
        proto.normalizer_spec.add_dummy_prefix = False
        self.sp_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.pieces = [p.piece for p in proto.pieces]
        self.vocab_size = len(self.pieces)
        Type = pb.ModelProto.SentencePiece.Type
        UNUSED, BYTE, CONTROL, UNKNOWN = Type.UNUSED, Type.BYTE, Type.CONTROL, Type.UNKNOWN  # enum lookups are slow
        self.mol_vocab: dict[str, int] = {}
        self.prot_vocab: dict[str, int] = {}
        self.special_ids: dict[str, int] = {}
        surface: list[bytes] = []
        for i, p in enumerate(proto.pieces):
            if p.type == UNUSED and p.piece.startswith(MOL_PREFIX):
                self.mol_vocab[p.piece[len(MOL_PREFIX):]] = i
                surface.append(p.piece[len(MOL_PREFIX):].encode())
            elif p.type == UNUSED and p.piece.startswith(PROT_PREFIX):
                self.prot_vocab[p.piece[len(PROT_PREFIX):]] = i
                surface.append(p.piece[len(PROT_PREFIX):].encode())
            elif p.type == BYTE:
                surface.append(bytes([int(p.piece[1:-1], 16)]))
            elif p.piece in SPAN_MARKERS or p.piece in SPECIALS:
                self.special_ids[p.piece] = i
                surface.append(p.piece.encode())
            elif p.type in (CONTROL, UNKNOWN):
                surface.append(b"")
            else:
                surface.append(p.piece.replace("\u2581", " ").encode())
        missing = [s for s in SPAN_MARKERS + SPECIALS if s not in self.special_ids]
        if missing or not self.mol_vocab or not self.prot_vocab:
            raise NotScienceTokenizer(f"{self.model_file} is not an extended science tokenizer "
                                      f"(missing {missing or 'span vocabularies'}); "
                                      f"build one with scidfm-build-tokenizer --base-model BASE.model "
                                      f"--output-dir DIR")
        self._surface = surface
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id, self.eod_id = self.special_ids[PAD], self.special_ids[EOD]
        self._added_start = min(min(self.mol_vocab.values()), min(self.prot_vocab.values()),
                                min(self.special_ids.values()))
        self.num_threads = -1  # SentencePiece batch-encode threads (-1: all cores)
        self._marker_ids = dict(self.special_ids, **{BOS_TEXT: self.bos_id, EOS_TEXT: self.eos_id})
        # Base-BPE encoders; tokenizer/fast.py swaps in GigaToken with the same ids (``self.fast``).
        self._bpe_first, self._bpe_cont, self.fast = self.sp.encode, self.sp_cont.encode, None

    # ------------------------------------------------------------------ encoding
    def _bpe(self, text: str, first: bool) -> list[int]:
        if not text:
            return []
        return (self._bpe_first if first else self._bpe_cont)(text)

    def _molecule(self, smiles: str) -> list[int]:
        ids: list[int] = []
        voc = self.mol_vocab
        for lex in split_smiles(smiles):
            i = voc.get(lex)
            if i is not None:
                ids.append(i)
                continue
            parts = spell_bracket_atom(lex) if lex.startswith("[") else None
            if parts is not None and all(p in voc for p in parts):
                ids.extend(voc[p] for p in parts)
            else:
                for ch in lex:
                    j = voc.get(ch)
                    ids.extend([j] if j is not None else self._bpe(ch, first=False))
        return ids

    def _protein(self, seq: str) -> list[int]:
        voc = self.prot_vocab
        ids: list[int] = []
        run_start = None  # characters outside the residue alphabet go through the base BPE, in runs
        for k, ch in enumerate(seq):
            j = voc.get(ch)
            if j is None:
                if run_start is None:
                    run_start = k
                continue
            if run_start is not None:
                ids.extend(self._bpe(seq[run_start:k], first=False))
                run_start = None
            ids.append(j)
        if run_start is not None:
            ids.extend(self._bpe(seq[run_start:], first=False))
        return ids

    def encode(self, text: str, *, allow_special: bool = False, bos: bool = False, eos: bool = False,
               continuation: bool = False) -> list[int]:
        """Token ids of ``text``. ``allow_special`` also turns the chat/document specials and the
        ``<s>``/``</s>`` strings into their tokens (chat templates need it; raw documents must not).
        ``continuation``: ``text`` continues a document (no SentencePiece dummy-prefix space), so
        encoding a text in consecutive pieces gives the same ids as encoding it whole."""
        pattern = _SPECIAL_RE if allow_special else _SPAN_RE
        ids: list[int] = [self.bos_id] if bos else []
        if pattern.search(text) is None:  # fast path: prose without spans
            ids.extend(self._bpe(text, first=not continuation))
        else:
            pos, mode, first = 0, None, not continuation
            for m in pattern.finditer(text):
                chunk = text[pos:m.start()]
                if chunk:
                    if mode == MOL_START:
                        ids.extend(self._molecule(chunk))
                    elif mode == PROT_START:
                        ids.extend(self._protein(chunk))
                    else:
                        ids.extend(self._bpe(chunk, first))
                    first = False
                marker = m.group()
                ids.append(self._marker_ids[marker])
                first = False
                if marker in (MOL_START, PROT_START):
                    mode = marker
                elif marker in (MOL_END, PROT_END):
                    mode = None
                pos = m.end()
            tail = text[pos:]
            if tail:
                if mode == MOL_START:  # unterminated span: the rest of the text is its content
                    ids.extend(self._molecule(tail))
                elif mode == PROT_START:
                    ids.extend(self._protein(tail))
                else:
                    ids.extend(self._bpe(tail, first))
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str], **kw) -> list[list[int]]:
        """Like ``encode`` for many texts; span-free ones go through SentencePiece's batch call."""
        allow_special = kw.get("allow_special", False)
        if allow_special:
            plain = [k for k, t in enumerate(texts) if _SPECIAL_RE.search(t) is None]
        else:  # substring tests are much cheaper than a regex over every document
            plain = [k for k, t in enumerate(texts) if "[START_" not in t and "[END_" not in t]
        out: list = [None] * len(texts)
        if plain and not kw.get("bos") and not kw.get("eos"):
            batch = [texts[k] for k in plain]
            encoded = self.fast.encode_batch(batch) if self.fast is not None else \
                self.sp.encode(batch, num_threads=self.num_threads)
            for k, ids in zip(plain, encoded, strict=False):
                out[k] = ids
        for k, t in enumerate(texts):
            if out[k] is None:
                out[k] = self.encode(t, **kw)
        return out

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Exact inverse of ``encode``. Specials (bos/eos, pad, eod, chat markers) render as their text
        unless ``skip_special``; span markers always render (they are part of the document)."""
        ids = [int(i) for i in ids]
        surface = self._surface
        bos_eos = (self.bos_id, self.eos_id)
        if skip_special:
            drop = set(bos_eos) | {self.special_ids[s] for s in SPECIALS}
            ids = [i for i in ids if i not in drop]
        parts = [surface[i] if i not in bos_eos else (BOS_TEXT if i == self.bos_id else EOS_TEXT).encode()
                 for i in ids]
        # The first text piece of a document carries SentencePiece's dummy-prefix space.
        k = next((n for n, i in enumerate(ids) if i not in bos_eos), None)
        if k is not None and ids[k] < self._added_start and parts[k].startswith(b" "):
            parts[k] = parts[k][1:]
        return b"".join(parts).decode("utf-8", errors="replace")

    def id_to_piece(self, i: int) -> str:
        return self.pieces[i]

    def token_kind(self, i: int) -> str:
        """"molecule", "protein", "special" or "text" (base BPE)."""
        if i >= self._added_start:
            p = self.pieces[i]
            if p.startswith(MOL_PREFIX):
                return "molecule"
            if p.startswith(PROT_PREFIX):
                return "protein"
            return "special"
        return "text"


def wrap_molecule(smiles: str) -> str:
    return f"{MOL_START}{smiles}{MOL_END}"


def wrap_protein(sequence: str) -> str:
    return f"{PROT_START}{sequence}{PROT_END}"


# ---------------------------------------------------------------------------------- chat format
# One definition of the instruction format, used by SFT data preparation (which masks the loss to the
# assistant segments) and by the Hugging Face chat template below; a test checks that they agree.
#   <s><|system|>{system}\n<|user|>{user}\n<|assistant|>{answer}</s>\n<|user|>...
# The assistant segment is its content plus the closing </s>: the model learns to stop.
ROLES = ("system", "user", "assistant")


def chat_segments(messages: list, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """[(text, is_assistant_target), ...] whose concatenation is the rendered conversation (with ``<s>``)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out: list[tuple[str, bool]] = [(BOS_TEXT, False)]
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {k}: expected an object with role and content")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ValueError(f"message {k}: role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"message {k}: content must be a string, got {type(content).__name__}")
        if role == "system":
            out.append((f"{SYSTEM}{content}\n", False))
        elif role == "user":
            out.append((f"{USER}{content}\n", False))
        else:
            out.append((ASSISTANT, False))
            out.append((f"{content}{EOS_TEXT}", True))
            out.append(("\n", False))
    if add_generation_prompt:
        out.append((ASSISTANT, False))
    return out


def encode_chat(tok: "ScienceTokenizer", messages: list) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a 0/1 mask marking the assistant targets (content + ``</s>``).
    The ids equal ``tok.encode(rendered, allow_special=True)`` of the whole rendered conversation."""
    ids: list[int] = []
    mask: list[int] = []
    for k, (text, target) in enumerate(chat_segments(messages)):
        seg = tok.encode(text, allow_special=True, continuation=k > 0)
        ids.extend(seg)
        mask.extend([int(target)] * len(seg))
    if not any(mask):
        raise ValueError("conversation has no assistant turn to learn from")
    return ids, mask


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


# ------------------------------------------------------------------------- Hugging Face tokenizer
# Defined only when transformers is already imported (it is, when AutoTokenizer loads this file as
# tokenization_scidfm.py): importing transformers just to tokenize would cost every preprocessing
# worker ~40 MB and seconds of start-up.
_HFBase: Any = None
if "transformers" in sys.modules:
    try:
        from transformers.tokenization_python import PythonBackend as _HFBase
    except Exception:  # noqa: BLE001  # pragma: no cover - transformers too old or broken: no HF class
        _HFBase = None

if _HFBase is not None:

    class SciDFMTokenizer(_HFBase):
        """transformers tokenizer over :class:`ScienceTokenizer`: same ids, chat template, decode."""

        vocab_files_names = {"vocab_file": "tokenizer.model"}
        model_input_names = ["input_ids", "attention_mask"]

        def __init__(self, vocab_file, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=PAD,
                     add_bos_token=True, **kwargs):
            self.vocab_file = vocab_file
            self.sci = ScienceTokenizer(vocab_file)
            self._piece_to_id = {p: i for i, p in enumerate(self.sci.pieces)}
            self.add_bos_token = add_bos_token
            kwargs.setdefault("chat_template", CHAT_TEMPLATE)
            kwargs.setdefault("special_tokens_pattern", "bos" if add_bos_token else "none")
            kwargs.setdefault("clean_up_tokenization_spaces", False)
            super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                             **kwargs)

        @property
        def vocab_size(self) -> int:
            return self.sci.vocab_size

        def get_vocab(self) -> dict:
            return dict(self._piece_to_id)

        def tokenize(self, text, **kwargs):
            # The whole text at once: spans need their markers as context, which the base class's
            # split-on-added-tokens would take away.
            return [self.sci.pieces[i] for i in self.sci.encode(text, allow_special=True)]

        def _tokenize(self, text, **kwargs):
            return self.tokenize(text)

        def _convert_token_to_id(self, token):
            return self._piece_to_id.get(token, self.sci.unk_id)

        def _convert_id_to_token(self, index):
            return self.sci.pieces[index]

        def convert_tokens_to_string(self, tokens):
            return self.sci.decode([self._convert_token_to_id(t) for t in tokens])

        def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            return self.sci.decode(token_ids, skip_special=skip_special_tokens)

        def save_vocabulary(self, save_directory, filename_prefix=None):
            import os
            import shutil

            name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
            dst = os.path.join(save_directory, name)
            if os.path.abspath(self.vocab_file) != os.path.abspath(dst):
                shutil.copyfile(self.vocab_file, dst)
            return (dst,)
