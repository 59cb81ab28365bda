"""Run a function on ``world_size`` gloo ranks forked from a clean server (OLMo-core's ``run_distributed_test``).

The ranks are forked from multiprocessing's fork server, which imported torch and megatron-core once
(``PRELOAD``), so a launch costs no import (a torchrun launch pays ~5 s per process for it), and they inherit
nothing of this process: forking pytest itself after an in-process test had made and destroyed a gloo group
crashed megatron's ``initialize_model_parallel`` with a segfault in the ranks. Each rank gets a fresh
gloo process group on a free port, one torch thread and torch's fresh-process seed, runs
``func(rank, world_size, *args)`` and exits; ``run_distributed`` returns rank 0's return value (every
rank's with ``all_ranks=True``). A failing rank raises :class:`DistributedTestError` with its traceback;
a timeout or an interrupt kills every rank and its children.

``func`` and its arguments are pickled (a module-level function). ``start_method="fork"`` forks this process
instead (only from a process that never made a process group, e.g. a spawned helper); ``"spawn"`` starts
fresh interpreters.
Tests of the user's real path (``torchrun -m ...``, SIGKILL and restart) launch with ``distributed.run_torchrun``.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

# torch's default CPU seed in a new process (a forked rank would otherwise continue this process's stream)
FRESH_SEED = 67280421310721
# imported once by the fork server, before it forks any rank
PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.parallel_state",
           "megatron.core.models.gpt", "megatron.core.optimizer", "megatron.core.distributed",
           "scidfm_megatron.testing.fork"]
RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                   "GROUP_RANK", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE")


class DistributedTestError(RuntimeError):
    """A rank failed, died or timed out; ``output`` holds every failed rank's traceback, ``rank`` the first."""

    def __init__(self, message: str, output: str, rank: int | None):
        super().__init__(message)
        self.output = output
        self.rank = rank


def _rank_main(func: Callable, rank: int, world_size: int, port: int, args: tuple, kwargs: dict,
               env: dict, results: str, all_ranks: bool, pg_timeout: float, group: bool) -> None:
    """Body of one rank (in the child). Never returns: the forked copy of the parent (pytest) must not run on."""
    code = 1
    try:
        try:  # Linux: die with the parent, so a killed test run leaves no rank behind
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        for k in RENDEZVOUS_VARS:
            os.environ.pop(k, None)
        os.environ.update(env)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                          OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        torch.manual_seed(FRESH_SEED)
        import sys

        if "megatron.core.parallel_state" in sys.modules:  # groups a test in the parent left (not ours to use)
            sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
        if group:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout))
        out = func(rank, world_size, *args, **kwargs)
        if rank == 0 or all_ranks:
            torch.save(out, f"{results}/rank{rank}.pt.tmp")
            os.replace(f"{results}/rank{rank}.pt.tmp", f"{results}/rank{rank}.pt")
        if dist.is_initialized():  # a rank that ends early must not take the store away from the others
            dist.barrier()
            dist.destroy_process_group()
        code = 0
    except BaseException:  # noqa: BLE001 - every failure of the rank is reported to the parent
        with open(f"{results}/rank{rank}.err", "w") as f:
            f.write(traceback.format_exc())
    finally:
        import sys

        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed capture stream must not keep the rank alive
                pass
        os._exit(code)


def _kill(procs) -> None:
    """SIGKILL every rank and everything it started, then reap them."""
    import psutil

    victims = []
    for p in procs:
        if p.pid is None:
            continue
        try:
            victims += psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        if p.is_alive():
            p.kill()
    for v in victims:
        try:
            v.kill()
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        if p.pid is not None:
            p.join(timeout=30)


def run_distributed(func: Callable, world_size: int, *args: Any, timeout: float = 600, env: dict | None = None,
                    kwargs: dict | None = None, start_method: str = "forkserver", all_ranks: bool = False,
                    grace: float = 10.0, process_group: bool = True) -> Any:
    """Run ``func(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks; return rank 0's result
    (a list of every rank's with ``all_ranks``). ``env`` is set in the ranks only (never in this process).
    The first rank to fail raises :class:`DistributedTestError` with its traceback; the others get ``grace``
    seconds to end by themselves, then are killed. After ``timeout`` seconds every rank is killed.
    ``process_group=False``: the ranks start none (e.g. a spawned process that forks ranks of its own)."""
    import multiprocessing
    import multiprocessing.connection

    import torch.distributed as dist

    from ..parallel import free_port

    env = dict(env or {})
    if start_method == "fork":
        if dist.is_available() and dist.is_initialized():
            raise RuntimeError("run_distributed cannot fork while this process has a torch.distributed process "
                               "group (the ranks would inherit it): destroy it first, or use start_method='spawn'")
        disabled = {n.strip() for n in env.get("SCIDFM_DISABLE_PATCHES", "").split(",") if n.strip()}
        if disabled:
            import megatron_patches

            if disabled & set(megatron_patches.applied()):
                raise RuntimeError(f"SCIDFM_DISABLE_PATCHES={env['SCIDFM_DISABLE_PATCHES']}: this process already "
                                   "applied those patches and forked ranks inherit them; use start_method='spawn'")
    ctx: Any = multiprocessing.get_context(start_method)  # its Process is the start method's
    if start_method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)  # read when the server starts (the first call), ignored after
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="run_distributed_") as results:
        procs = [ctx.Process(target=_rank_main, name=f"rank{r}", daemon=False,
                             args=(func, r, world_size, port, args, kwargs or {}, env, results, all_ranks,
                                   max(timeout, 60), process_group))
                 for r in range(world_size)]
        failed: list[int] = []  # ranks in the order their failure was seen
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + timeout
            pending = {p.sentinel: r for r, p in enumerate(procs)}
            stop_at = deadline
            while pending:
                now = time.monotonic()
                if now >= stop_at:
                    break
                for s in multiprocessing.connection.wait(list(pending), timeout=min(1.0, stop_at - now)):
                    r = pending.pop(s)
                    procs[r].join()
                    if procs[r].exitcode != 0:
                        failed.append(r)
                        stop_at = min(stop_at, time.monotonic() + grace)
            timed_out = bool(pending) and not failed
        finally:
            _kill(procs)  # no-op for ranks that ended; kills the rest (timeout, failure, interrupt)
        if failed or timed_out:
            raise _error(procs, failed, Path(results), timeout if timed_out else None, func)
        if all_ranks:
            return [_load(Path(results) / f"rank{r}.pt") for r in range(world_size)]
        return _load(Path(results) / "rank0.pt")


def _load(path: Path):
    import torch

    return torch.load(path, weights_only=False)


def _error(procs, failed: list[int], results: Path, timeout: float | None, func) -> DistributedTestError:
    name = getattr(func, "__qualname__", repr(func))
    reports = []
    for r in failed + [r for r in range(len(procs)) if r not in failed]:
        err = results / f"rank{r}.err"
        if err.exists():
            reports.append((r, err.read_text()))
        elif r in failed:
            reports.append((r, f"rank {r} died with exit code {procs[r].exitcode} and no traceback\n"))
    output = "".join(f"--- rank {r} ---\n{text}" for r, text in reports)
    if timeout is not None:
        return DistributedTestError(f"{name} on {len(procs)} ranks did not finish in {timeout:.0f} s; every rank "
                                    f"was killed\n{output}", output, None)
    from .distributed import root_cause

    first, text = reports[0]
    cause = root_cause(text) or (text.strip().splitlines() or [""])[-1]
    return DistributedTestError(f"{name} failed on rank {first} of {len(procs)}: {cause}\n{text}", output, first)
