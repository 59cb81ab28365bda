"""Which checkpoint a run will start from, and whether it can serve the run: found by ``validate_run``
(``--check`` and every rank before setup), so an unservable resume stops in one line before anything is built.

The trainer's order (``Trainer._restore``): the newest complete checkpoint in ``checkpoint.save``, else
``checkpoint.resume_from``, else ``checkpoint.init_from`` (weights only). A full resume must keep the global
batch and the sequence length (``checkpoint.check_data_position``) and the tokenizer (its fingerprint, kept
in the checkpoint's ``scidfm_meta.json`` since this release: ``tokenizer.fingerprint``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from ..config import ConfigError
from . import checkpoint as ckpt


def start_point(cfg) -> tuple[Optional[Path], bool]:
    """(checkpoint directory, weights_only) the run will load, or (None, False) for a fresh start.
    Reads only: interrupted saves are left for the run itself to report and clean up."""
    c = cfg.checkpoint
    done = ckpt.complete_checkpoints(c.save) if c.save else []  # the trainer's find_resume, without its log
    resume = done[-1][1] if done else None
    if resume is not None:
        return resume, ckpt.is_weights_only(resume)
    if c.resume_from:
        found = ckpt.resolve(c.resume_from, "checkpoint.resume_from")
        if ckpt.is_weights_only(found):
            raise ConfigError(f"checkpoint.resume_from {found} holds weights only (no optimizer state): "
                              f"start from it with checkpoint.init_from={found}")
        return found, False
    if c.init_from:
        return ckpt.resolve(c.init_from, "checkpoint.init_from"), True
    return None, False


def recorded_fingerprint(meta: dict) -> Optional[dict]:
    rec = meta.get("tokenizer")
    return rec.get("fingerprint") if isinstance(rec, dict) else None


def check_resume(cfg, tokenizer_fp: Optional[Mapping] = None) -> Optional[Path]:
    """Raise ConfigError (one line, naming the key and the fix) when the checkpoint the run would continue
    from cannot serve it; returns that checkpoint (None for a fresh start or a weights-only start)."""
    from ..tokenizer.fingerprint import same_tokenizer, tokenizer_fingerprint

    path, weights_only = start_point(cfg)
    if path is None or weights_only:
        return None
    try:
        meta = ckpt.read_meta(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}/scidfm_meta.json cannot be read ({exc}); the checkpoint is damaged: remove it "
                          f"or point checkpoint.resume_from at another") from None
    try:
        ckpt.check_data_position(meta.get("config"), cfg.train, path)
    except ckpt.CheckpointMismatch as exc:
        raise ConfigError(str(exc)) from None
    saved = recorded_fingerprint(meta)
    if saved:
        here = tokenizer_fp or tokenizer_fingerprint(cfg.data.tokenizer_model)
        if not same_tokenizer(saved, here):
            raise ConfigError(
                f"{path} was trained with another tokenizer (sha256 {saved['sha256'][:12]}, {saved.get('vocab_size')} "
                f"tokens) than data.tokenizer_model {cfg.data.tokenizer_model} (sha256 {here['sha256'][:12]}, "
                f"{here.get('vocab_size')} tokens): a resume keeps the tokenizer. Set data.tokenizer_model to "
                f"the checkpoint's copy, {path / 'tokenizer.model'}, or start a new run (another checkpoint.save)")
    return path
