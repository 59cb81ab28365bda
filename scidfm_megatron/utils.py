"""Small helpers shared across the library (no torch import: the preprocessing path uses them)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


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
