"""The worker side of ``data/preprocess.py``: each worker process loads the tokenizer once, then validates,
decodes, wraps and tokenizes blocks of raw lines, returning token arrays and the rejected lines with their
reasons (docs/data.md, "Preprocessing")."""

from __future__ import annotations

import itertools
import json
import signal
from typing import cast

import numpy as np

from ..utils import decode_line, lone_surrogate

SURROGATE_FIX = " (not valid Unicode: an emoji or character cut in half?); repair or drop the line"
_W: dict = {}


def init_worker(model_file: str, keys: list[str], spans: dict, append_eod: bool, dtype: str, mode: str = "text",
                sft_formats: tuple = (), in_pool: bool = True) -> None:
    if in_pool:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides how to stop
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # forked workers must not run the parent's handler
    try:
        from ..tokenizer.core import wrap_molecule, wrap_protein
        from ..tokenizer.plain import load_tokenizer

        # The science tokenizer, or any SentencePiece model (tokenizer/plain.py); GigaToken where it gives
        # SentencePiece's ids (tokenizer/fast.py).
        tok = load_tokenizer(model_file, fast=True)
        tok.num_threads = 1  # one SentencePiece thread per worker process: the workers are the parallelism
        from ..tokenizer.fast import encode_arrays

        _W.update(tok=tok, encode_arrays=encode_arrays, keys=keys, append_eod=append_eod, dtype=np.dtype(dtype),
                  mode=mode, sft_formats=sft_formats,
                  wrap={k: (wrap_molecule if v == "molecule" else wrap_protein) for k, v in spans.items()})
    except BaseException as exc:  # noqa: BLE001  surface it on the first batch: a Pool would respawn failing workers
        _W["init_error"] = f"{type(exc).__name__}: {exc}"


def _type_name(v) -> str:
    return {dict: "an object", list: "a list", type(None): "null", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(v), type(v).__name__)


def encode_batch(batch: tuple[int, int, bytes]):
    """Validate + tokenize one block of whole lines.

    ``batch`` is (file index, number of the block's first line, raw bytes). Returns (file index, per-key
    (flat tokens in the output dtype, lengths), rejections, empty, blank, bytes, lines)."""
    if "init_error" in _W:
        from ..errors import PreprocessError

        raise PreprocessError(f"tokenizer worker failed to start: {_W['init_error']}")
    file_idx, first_line, block = batch
    tok, keys, wrap = _W["tok"], _W["keys"], _W["wrap"]
    texts: dict[str, list[str]] = {k: [] for k in keys}
    rejects: list[tuple[int, str]] = []
    chats: list[tuple[list[int], list[int]]] = []
    empty = blank = nul = 0
    lines = block.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    for lineno, raw in enumerate(lines, start=first_line):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw.strip():
            blank += 1
            continue
        at = raw.find(b"\x00")
        if at >= 0:
            rejects.append((lineno, f"NUL byte at byte {at}; remove NUL bytes from the input"))
            continue
        text, bad_utf8 = decode_line(raw)
        if bad_utf8:
            rejects.append((lineno, bad_utf8))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            rejects.append((lineno, f"invalid JSON: {e.msg} at column {e.colno}"))
            continue
        if not isinstance(obj, dict):
            rejects.append((lineno, f"expected a JSON object, got {_type_name(obj)}"))
            continue
        if _W["mode"] == "chat":  # messages, ShareGPT, Alpaca or query/response records (sft_formats.py)
            from ..tokenizer.core import encode_chat
            from .sft_formats import main_key, record_messages

            fmt = _W["sft_formats"][file_idx]
            messages, bad = record_messages(obj, fmt, keys[0])
            if bad:
                rejects.append((lineno, bad + (SURROGATE_FIX if "lone surrogate" in bad else "")))
                continue
            try:
                chats.append(encode_chat(tok, cast(list, messages)))  # not None without bad
            except ValueError as exc:
                rejects.append((lineno, f"key {main_key(fmt, keys[0])!r}: {exc}"))
            continue
        bad = None
        values = []
        for k in keys:
            if k not in obj:
                bad = f"missing key {k!r} (keys present: {sorted(obj)[:8]}); choose --json-keys accordingly"
                break
            v = obj[k]
            if not isinstance(v, str):
                bad = f"key {k!r} is {_type_name(v)}, expected a string"
                break
            bad = lone_surrogate(v, f"key {k!r}")
            if bad:
                bad += SURROGATE_FIX
                break
            values.append(v)
        if bad:
            rejects.append((lineno, bad))
            continue
        nul += any("\x00" in v for v in values)  # escaped NUL: valid JSON, kept (and counted)
        for k, v in zip(keys, values, strict=False):
            if not v.strip():
                empty += 1
                continue
            texts[k].append(wrap[k](v) if k in wrap else v)
    out = {}
    if _W["mode"] == "chat":
        lengths = np.fromiter((len(ids) for ids, _ in chats), dtype=np.int32, count=len(chats))
        flat = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in chats), dtype=_W["dtype"],
                           count=int(lengths.sum()))
        mask = np.fromiter(itertools.chain.from_iterable(m for _, m in chats), dtype=np.uint8, count=int(lengths.sum()))
        return file_idx, {keys[0]: (flat, lengths, mask)}, rejects, empty, blank, len(block), len(lines), nul
    eod = _W["append_eod"]
    for k in keys:
        flat, lengths = _W["encode_arrays"](tok, texts[k])
        if eod and len(lengths):
            flat = np.insert(flat, np.cumsum(lengths), tok.eod_id)
            lengths = lengths + 1
        out[k] = (flat.astype(_W["dtype"], copy=False), lengths.astype(np.int32, copy=False))
    return file_idx, out, rejects, empty, blank, len(block), len(lines), nul
