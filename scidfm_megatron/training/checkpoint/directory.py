"""The checkpoint directory protocol, shared by training, inference and conversion: the ``iter_N`` /
``iter_N.tmp`` / ``latest`` layout of a save directory, which checkpoint a resume takes, and the
``scidfm_meta.json`` record each checkpoint carries (docs/training.md, "Checkpoints")."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Optional

log = logging.getLogger("scidfm.checkpoint")
_ITER = re.compile(r"^iter_(\d{7})$")


TOKENIZER_FILE = "tokenizer.model"  # the run's tokenizer, copied into every checkpoint it saves


def tokenizer_file(path: str | Path, meta: Optional[dict] = None) -> Optional[Path]:
    """The tokenizer a checkpoint keeps (its copy inside the checkpoint directory), else None."""
    meta = read_meta(path) if meta is None else meta
    rec = meta.get("tokenizer")
    if isinstance(rec, dict) and rec.get("file") and (Path(path) / rec["file"]).is_file():
        return Path(path) / rec["file"]
    return None


def iter_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _ITER.match(p.name)
        if m and p.is_dir() and (p / "metadata.json").exists() and (p / "scidfm_meta.json").exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_resume(root: str | Path, cleanup: bool = True) -> Optional[Path]:
    """The newest complete checkpoint under ``root``; interrupted saves are reported (and removed)."""
    root = Path(root)
    if not root.is_dir():
        return None
    for p in sorted(root.glob("iter_*.tmp")):
        log.warning("ignoring interrupted checkpoint save %s (it never completed)%s", p,
                    "; removing it" if cleanup else "")
        if cleanup:
            shutil.rmtree(p, ignore_errors=True)
    done = complete_checkpoints(root)
    latest = root / "latest"
    if latest.exists() and done:
        marked = int(latest.read_text().strip() or -1)
        if marked != done[-1][0]:
            log.warning("%s says iteration %s but iter_%07d is complete and newer; using it",
                        latest, marked, done[-1][0])
    return done[-1][1] if done else None


def resolve(path: str | Path, key: str) -> Path:
    """A checkpoint directory, or a save directory (its newest complete checkpoint); fails naming ``key``."""
    from ...config import ConfigError

    src = Path(path)
    found = src if (src / "metadata.json").exists() else find_resume(src, cleanup=False)
    if found is None:
        raise ConfigError(f"{key} {src}: no complete checkpoint there")
    return found


def read_meta(path: str | Path) -> dict:
    """A checkpoint's ``scidfm_meta.json``: iteration, layout, formats, weights_only, the run config."""
    return json.loads((Path(path) / "scidfm_meta.json").read_text())


def saved_config(path: str | Path) -> Optional[dict]:
    """The run config a checkpoint was written with (None for converted checkpoints)."""
    return read_meta(path).get("config")


def is_weights_only(path: str | Path) -> bool:
    """True for a checkpoint without optimizer state (e.g. converted from Hugging Face)."""
    return bool(read_meta(path).get("weights_only"))
