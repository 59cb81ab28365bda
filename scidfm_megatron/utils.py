"""Small helpers shared across the library (no torch import: the preprocessing path uses them)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary sibling and a rename: readers see all of it or nothing."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_dir(dst: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in ``DST.tmp-<pid>`` and move it to ``dst`` only when the block completes (an
    existing ``dst`` is replaced then); on any exception, including KeyboardInterrupt, the temporary
    directory is removed and ``dst`` is left as it was."""
    dst = Path(dst)
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def decode_line(raw: bytes) -> tuple:
    """(text, None) for a UTF-8 line, else (None, the reason naming the byte and the fix)."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start} ({raw[e.start:e.start + 4]!r}); re-encode the file as UTF-8"


_SURROGATE = None


def lone_surrogate(value, where: str = "") -> str | None:
    """Where ``value`` (a str, or JSON-parsed lists/dicts of them) holds a lone UTF-16 surrogate, else None.

    ``json.loads`` accepts escaped lone surrogates (``"\\ud800"``, common in web dumps where an emoji was cut
    in half) and returns a str that is not valid Unicode: SentencePiece, protobuf and UTF-8 encoders then
    fail deep inside a run. Callers reject such a record with this description (e.g.
    ``messages[2].content: lone surrogate U+D83D at character 41``)."""
    global _SURROGATE
    if isinstance(value, str):
        if _SURROGATE is None:
            import re

            _SURROGATE = re.compile("[\ud800-\udfff]")
        m = _SURROGATE.search(value)
        if m is None:
            return None
        return f"{where or 'text'}: lone surrogate U+{ord(m.group()):04X} at character {m.start()}"
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for k, v in items:
        sub = f"{where}{k}" if str(k).startswith("[") else (f"{where}.{k}" if where else str(k))
        found = lone_surrogate(v, sub)
        if found:
            return found
    return None
