"""Input checks shared by every metric family."""

from __future__ import annotations

from typing import Sequence


def _check_pairs(a: Sequence, b: Sequence, what: str, names: tuple[str, str] = ("preds", "refs")) -> int:
    if len(a) != len(b):
        raise ValueError(f"{what}: {names[0]} has {len(a)} items but {names[1]} has {len(b)}")
    if len(a) == 0:
        raise ValueError(f"{what}: empty inputs ({names[0]} and {names[1]} have 0 items)")
    return len(a)
