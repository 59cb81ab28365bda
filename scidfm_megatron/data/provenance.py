"""Which tokenizer made a dataset, and whether a run's tokenizer and model can read it.

``scidfm-preprocess`` records in ``<prefix>_summary.json`` the tokenizer's fingerprint (sha256 of the
``.model`` file, piece count, kind: :mod:`scidfm_megatron.tokenizer.fingerprint`) and the largest token
id written, per output. ``validate_run`` (``scidfm-train --check``, and every rank before it builds
anything) compares them with ``data.tokenizer_model`` and ``model.vocab_size`` through
:func:`check_run_data`, for every dataset of the run (the mixture's sources for
``data.epoch``, or the SFT prefix). A dataset whose summary has no fingerprint (made before it was
recorded, or by other tools) is checked by its largest id alone, read from its ``.bin`` when the
summary does not have it, and a line says so.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:
    from ..tokenizer.fingerprint import Fingerprint


def summary_for(prefix: str) -> tuple[Optional[Path], dict, Optional[str]]:
    """(summary file, its content, output key) of the preprocess run that wrote dataset ``prefix``
    (``<out>_<key>_document`` for text, ``<out>`` for SFT), or (None, {}, None) when none is found."""
    candidates = [prefix] + [prefix[:i] for i in range(len(prefix) - 1, 0, -1) if prefix[i] == "_"]
    for cand in candidates:
        path = Path(f"{cand}_summary.json")
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        for key, out in (data.get("outputs") or {}).items():
            if os.path.abspath(out) == os.path.abspath(prefix) or \
                    os.path.abspath(f"{out}_tokens") == os.path.abspath(prefix):
                return path, data, key
    return None, {}, None


def scan_largest_id(bin_prefix: str) -> Optional[int]:
    """The largest token id in ``<bin_prefix>.bin`` (read in chunks; dtype from the ``.idx`` header), None
    when the dataset does not exist or is empty."""
    import numpy as np

    from .indexed import DTYPE_CODES, INDEX_HEADER

    idx, bin_ = Path(f"{bin_prefix}.idx"), Path(f"{bin_prefix}.bin")
    if not idx.is_file() or not bin_.is_file():
        return None
    with open(idx, "rb") as f:
        head = f.read(len(INDEX_HEADER) + 9)
    code = head[-1] if head[:len(INDEX_HEADER)] == INDEX_HEADER else None
    dtype = {c: t for t, c in DTYPE_CODES.items()}.get(code)  # type: ignore[arg-type]  # None: not an index
    if dtype is None:
        return None
    data = np.memmap(bin_, dtype=dtype, mode="r")
    if not data.size:
        return None
    step = 1 << 26
    return max(int(data[k:k + step].max()) for k in range(0, data.size, step))


def _short(fp: Mapping[str, Any]) -> str:
    return f"{fp.get('sha256', '?')[:12]} ({fp.get('kind', '?')}, {fp.get('vocab_size', '?')} tokens)"


def check_dataset(prefix: str, tok_fp: Fingerprint, tokenizer_model: str, model_vocab: int, what: str) -> None:
    """One dataset against the run's tokenizer fingerprint and model vocabulary (ConfigError, one line)."""
    from ..config import ConfigError
    from ..tokenizer.fingerprint import same_tokenizer

    bin_prefix = f"{prefix}_tokens" if what == "data.sft_prefix" else prefix
    if not Path(f"{bin_prefix}.idx").is_file():
        return  # not made yet: building the datasets names it (mixture.count_tokens, SFTDataset)
    summary_path, summary, key = summary_for(prefix)
    fix = f"re-run scidfm-preprocess with --tokenizer-model {tokenizer_model}, or set data.tokenizer_model to the " \
          f"tokenizer the data was made with"
    recorded = summary.get("tokenizer") if isinstance(summary.get("tokenizer"), dict) else None
    if recorded and recorded.get("sha256"):
        if not same_tokenizer(recorded, tok_fp):
            raise ConfigError(f"{what}: {summary_path} says {prefix} was made with tokenizer {_short(recorded)} "
                              f"but data.tokenizer_model {tokenizer_model} is {_short(tok_fp)}: {fix}")
    largest = (summary.get("largest_id") or {}).get(key) if key else None
    scanned = largest is None
    if scanned:
        largest = scan_largest_id(bin_prefix)
    if not recorded:
        if os.environ.get("RANK", "0") == "0":  # one line per run, not per rank
            print(f"[scidfm] {what}: no tokenizer fingerprint recorded for {prefix} ("
                  f"{f'{summary_path} predates it' if summary_path else 'no scidfm-preprocess summary'}); checked by "
                  f"its largest token id only ({'no data' if largest is None else largest}"
                  f"{f', read from {bin_prefix}.bin' if scanned and largest is not None else ''})",
                  file=sys.stderr, flush=True)
    if largest is not None and largest >= model_vocab:
        raise ConfigError(f"{what}: {bin_prefix}.bin holds token id {largest} but model.vocab_size is {model_vocab} "
                          f"(ids 0..{model_vocab - 1}): the data was made with another tokenizer; {fix}")


def run_datasets(cfg) -> list[tuple[str, str]]:
    """(dataset prefix, the recipe key it comes from) for every dataset the run reads (no file is read)."""
    d = cfg.data
    if cfg.train.stage == "sft":
        return [(d.sft_prefix, "data.sft_prefix")] if d.sft_prefix else []
    from .mixture import Mixture

    mix = Mixture.load(d.mixture, data_root=d.data_root)
    prefixes = [mix.path(p) for p in (s.for_epoch(d.epoch)[0] for s in mix.sources) if p]
    return [(p, f"data.mixture {d.mixture}") for p in prefixes]


def run_tokenizer(cfg) -> Fingerprint:
    """The fingerprint of ``data.tokenizer_model`` (science or plain); SFT with a plain one is refused."""
    from google.protobuf.message import DecodeError

    from ..config import ConfigError
    from ..tokenizer.fingerprint import tokenizer_fingerprint

    d = cfg.data
    try:
        fp = tokenizer_fingerprint(d.tokenizer_model)
    except (OSError, ValueError, RuntimeError, DecodeError) as exc:
        raise ConfigError(f"data.tokenizer_model: {d.tokenizer_model} is not a SentencePiece model ({exc}); give the "
                          f"tokenizer.model the data was preprocessed with") from None
    if cfg.train.stage == "sft" and fp["kind"] != "science":
        raise ConfigError(f"train.stage: sft needs the chat markers of a science tokenizer, and data.tokenizer_model "
                          f"{d.tokenizer_model} is a plain SentencePiece model: build one with scidfm-build-tokenizer "
                          f"--base-model {d.tokenizer_model} (and preprocess the SFT data with it)")
    return fp


def check_run_data(cfg, fp: Fingerprint) -> None:
    """Every dataset of the run against the tokenizer fingerprint ``fp`` and ``model.vocab_size``."""
    for prefix, what in run_datasets(cfg):
        check_dataset(prefix, fp, cfg.data.tokenizer_model, cfg.model.vocab_size, what)
