"""Which tokenizer a conversion carries (``science``, ``sentencepiece``, ``hf`` or ``none``), told apart by
inspecting its files, and how each is written; refusals raise :class:`TokenizerError` before anything is
written (docs/conversion.md, "What comes out")."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, cast

from ..errors import TokenizerError  # re-export: defined in scidfm_megatron/errors.py

# Files that make up a Hugging Face tokenizer folder (copied verbatim when present), plus the code
# files that tokenizer_config.json's auto_map may name.
HF_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                      "chat_template.json", "science_tokens.json")
HF_MARKERS = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class Tokenizer:
    """The tokenizer a conversion carries, as found by inspecting its files: its kind, the files copied and the ids
    the export's configs name."""
    kind: str  # science | sentencepiece | hf | none
    path: Optional[Path] = None  # the .model file (science, sentencepiece) or the folder (hf)
    vocab_size: Optional[int] = None  # ids the tokenizer can emit (max id + 1); None when unknown
    files: list[Path] = field(default_factory=list)  # copied verbatim
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pad_id: Optional[int] = None
    eod_id: Optional[int] = None  # <|eod|>, which pretraining appends to every document (None: not in the vocabulary)

    def describe(self) -> str:
        if self.kind == "none":
            return "none (weights-only conversion: no tokenizer files written)"
        what = {"science": "science tokenizer", "sentencepiece": "plain SentencePiece model",
                "hf": "Hugging Face tokenizer folder, copied as it is"}[self.kind]
        return f"{what} {self.path} ({self.vocab_size if self.vocab_size is not None else 'unknown'} tokens)"

    def check_fits(self, model_vocab: int, where: str, fix: str) -> None:
        if self.vocab_size is not None and self.vocab_size > model_vocab:
            raise TokenizerError(
                f"tokenizer {self.path} has {self.vocab_size} tokens but the model's vocabulary ({where}) is "
                f"{model_vocab}: ids above {model_vocab - 1} would have no embedding; {fix}")


NONE = Tokenizer("none")


def _sp_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError and friends
        proto = None
    if proto is None or not len(proto.pieces):
        raise TokenizerError(f"{path}: not a SentencePiece model (give a tokenizer.model, a Hugging Face "
                             f"tokenizer folder, or --tokenizer none)")
    return proto


def _is_science(proto) -> bool:
    from ..tokenizer.core import SPAN_MARKERS, SPECIALS

    pieces = {p.piece for p in proto.pieces}
    return all(s in pieces for s in SPAN_MARKERS + SPECIALS)


def _sp_tokenizer(model: Path) -> Tokenizer:
    proto = _sp_proto(model)
    spec = proto.trainer_spec

    def sid(i):
        return i if 0 <= i < len(proto.pieces) else None

    from ..tokenizer.core import EOD

    eod = next((i for i, p in enumerate(proto.pieces) if p.piece == EOD), None)
    if _is_science(proto):
        from ..tokenizer.core import PAD

        pad = next(i for i, p in enumerate(proto.pieces) if p.piece == PAD)
        files = [model] + ([model.parent / "science_tokens.json"] if (model.parent / "science_tokens.json").exists()
                           else [])
        return Tokenizer("science", model, len(proto.pieces), files, sid(spec.bos_id), sid(spec.eos_id), pad, eod)
    return Tokenizer("sentencepiece", model, len(proto.pieces), [model], sid(spec.bos_id), sid(spec.eos_id),
                     sid(spec.pad_id), eod)


def _hf_folder(d: Path) -> Tokenizer:
    files = [d / f for f in HF_TOKENIZER_FILES if (d / f).is_file()]
    files += sorted(p for p in d.glob("tokenization_*.py") if p.is_file())
    ids: list[int] = []
    bos = eos = pad = eod = None
    if (d / "tokenizer.json").is_file():
        try:
            tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
        except ValueError as exc:
            raise TokenizerError(f"{d / 'tokenizer.json'}: not valid JSON ({exc})") from None
        vocab = (tj.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            ids += [int(v) for v in vocab.values()]
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            ids.append(len(vocab) - 1)
        ids += [int(t["id"]) for t in tj.get("added_tokens") or []]
    elif (d / "tokenizer.model").is_file():
        sp = _sp_tokenizer(d / "tokenizer.model")
        ids.append(cast(int, sp.vocab_size) - 1)  # known for a SentencePiece model
        bos, eos, pad, eod = sp.bos_id, sp.eos_id, sp.pad_id, sp.eod_id
    elif (d / "vocab.json").is_file():
        ids += [int(v) for v in json.loads((d / "vocab.json").read_text(encoding="utf-8")).values()]
    cfg_file = d / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise TokenizerError(f"{cfg_file}: not valid JSON ({exc})") from None
        ids += [int(k) for k in (cfg.get("added_tokens_decoder") or {})]
    return Tokenizer("hf", d, (max(ids) + 1) if ids else None, files, bos, eos, pad, eod)


def inspect(path: str | Path) -> Tokenizer:
    """The tokenizer at ``path``: a ``.model`` file, a folder, or the word ``none``."""
    if str(path).lower() == "none":
        return NONE
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"tokenizer {p} not found (pass --tokenizer DIR_OR_tokenizer.model, or --tokenizer none "
                             f"for a weights-only conversion)")
    if p.is_file():
        return _sp_tokenizer(p)
    if any((p / f).is_file() for f in HF_MARKERS):
        return _hf_folder(p)
    if (p / "tokenizer.model").is_file():
        return _sp_tokenizer(p / "tokenizer.model")
    raise TokenizerError(f"{p}: no tokenizer files (tokenizer.model, tokenizer.json or tokenizer_config.json); "
                         f"pass the tokenizer's folder or file, or --tokenizer none for a weights-only conversion")


def in_folder(d: Path) -> Tokenizer:
    """The tokenizer a model folder carries (``none`` when it has no tokenizer files)."""
    if any((d / f).is_file() for f in HF_MARKERS + ("tokenizer.model",)):
        return inspect(d)
    return NONE


def write(tok: Tokenizer, dst: Path, *, model_max_length: int, hf_files: bool = True) -> None:
    """Put the tokenizer into folder ``dst``. ``hf_files``: also generate the Hugging Face files a
    science / plain SentencePiece model needs to load with ``AutoTokenizer`` (an HF export)."""
    if tok.kind == "none":
        return
    dst.mkdir(parents=True, exist_ok=True)
    if tok.kind == "hf":
        for f in tok.files:
            shutil.copyfile(f, dst / f.name)
        return
    shutil.copyfile(cast(Path, tok.path), dst / "tokenizer.model")  # every kind but none has a path
    for f in tok.files[1:]:
        shutil.copyfile(f, dst / f.name)
    if not hf_files:
        return
    if tok.kind == "science":
        from ..tokenizer.core import ScienceTokenizer
        from ..tokenizer.hf import write_hf_tokenizer_files

        write_hf_tokenizer_files(dst, ScienceTokenizer(str(tok.path)), model_max_length=model_max_length)
    else:
        from ..tokenizer import hf_plain

        try:
            notes = hf_plain.write(dst, tok.path, model_max_length)
        except hf_plain.PlainExportError as exc:
            raise TokenizerError(str(exc)) from None
        for note in notes:
            print(f"[scidfm] tokenizer: {note}", flush=True)


def encode(tok: Tokenizer, text: str) -> Optional[list[int]]:
    """``text`` as this tokenizer's ids (with BOS where the tokenizer adds one); None for ``none``."""
    path = cast(Path, tok.path)  # None only for kind "none"
    if tok.kind == "science":
        from ..tokenizer.core import ScienceTokenizer

        return ScienceTokenizer(str(path)).encode(text, bos=True)
    if tok.kind == "sentencepiece" or (tok.kind == "hf" and (path / "tokenizer.model").is_file()
                                       and not (path / "tokenizer.json").is_file()):
        import sentencepiece as spm

        model = path if tok.kind == "sentencepiece" else path / "tokenizer.model"
        sp = spm.SentencePieceProcessor(model_file=str(model))
        return ([sp.bos_id()] if sp.bos_id() >= 0 else []) + sp.encode(text)
    if tok.kind == "hf" and (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as Fast

        return Fast.from_file(str(path / "tokenizer.json")).encode(text).ids
    return None
