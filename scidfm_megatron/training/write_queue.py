"""The queue megatron's checkpoint writer returns its write results through, made cheaper and orphan-safe.

megatron-core (dist_checkpointing/strategies/filesystem_async.py) keeps each rank's write results in a queue
served by a ``multiprocessing`` Manager process (spawned), made on the first save. Two costs come with it:

- A rank killed by SIGKILL leaves that process behind forever, holding the job's output open, so a launcher
  reading it never sees the end (seen as hangs of the restart test). Ours dies with its rank
  (Linux: PR_SET_PDEATHSIG).
- The results are ``torch.distributed.checkpoint`` objects: the Manager unpickled them, importing torch on
  the first save (1.8 s on the save's path and 275 MiB per rank, against 0.02 s and 20 MiB for ours:
  ``python tools/bench_write_queue.py``). Ours carries pickled bytes, so the Manager never imports torch; the
  writer and the rank (which have torch) pickle and unpickle.

This module imports neither torch nor megatron at import time: the spawned Manager unpickles its initializer
from here."""

from __future__ import annotations

import pickle
import signal
import sys
from typing import Any


def _die_with_parent() -> None:  # runs in the Manager process (spawned): SIGKILL when its rank dies
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class BytesQueue:
    """A Manager queue proxy that moves pickles: ``put`` pickles, ``get`` / ``get_nowait`` unpickle, so the
    Manager holds bytes. The methods megatron's writer calls; picklable (the proxy is) for a spawned writer."""

    def __init__(self, proxy):
        self._q = proxy

    def put(self, obj: Any, *args, **kwargs) -> None:
        self._q.put(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), *args, **kwargs)

    def get(self, *args, **kwargs) -> Any:
        return pickle.loads(self._q.get(*args, **kwargs))

    def get_nowait(self) -> Any:
        return pickle.loads(self._q.get_nowait())

    def empty(self) -> bool:
        return self._q.empty()

    def qsize(self) -> int:
        return self._q.qsize()


def orphan_safe_write_queue() -> None:
    """Install our queue as megatron's (before its first save; a no-op once one exists, or off Linux)."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if getattr(fa, "_results_queue", "absent") is not None or not sys.platform.startswith("linux"):
        return  # already made (or megatron changed): leave it
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_die_with_parent)
    fa._results_queue = BytesQueue(manager.Queue())
    fa._scidfm_manager = manager  # keep it alive
