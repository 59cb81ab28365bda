"""Faults a long run meets and what the trainer does about each (non-finite steps, loss spikes, hangs,
stragglers, failed saves), and the ``faults:`` drills that make them happen on purpose (docs/training.md,
"Faults")."""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..config import ConfigError
from ..errors import RunStopped, SaveFailed  # re-export: defined in scidfm_megatron/errors.py

log = logging.getLogger("scidfm.faults")

HANG_EXIT_CODE = 124
HANG_FLOOR_S = 900.0  # automatic hang timeout: at least this ...
HANG_STEP_MULTIPLE = 20.0  # ... and this many times the median iteration time
STRAGGLER_RATIO = 1.2


@dataclass
class FaultsConfig:
    """Fault drills (``faults:`` in a recipe), for tests and fire drills; all off by default. Iterations
    are 1-based (the iteration the step produces); a drill fires in the first attempt of a torchrun job
    only (TORCHELASTIC_RESTART_COUNT unset or 0)."""

    nan_at_iter: Optional[int] = None  # every gradient of this iteration is NaN (the loss stays finite), every rank
    hang_at_iter: Optional[int] = None  # hang_rank stops in this iteration (sleeps forever) before its step
    hang_rank: int = 0
    kill_at_iter: Optional[int] = None  # kill_rank SIGKILLs itself in this iteration, after backward
    kill_rank: int = 0
    save_error_at_iter: Optional[int] = None  # the save at this iteration fails on save_error_rank (ENOSPC)
    save_error_rank: int = 0
    slow_rank: Optional[int] = None  # this rank sleeps slow_s at the start of every step (straggler drill)
    slow_s: float = 0.0

    def validate(self, world_size: int) -> None:
        for key in ("hang_rank", "kill_rank", "save_error_rank", "slow_rank"):
            v = getattr(self, key)
            if v is not None and not 0 <= v < world_size:
                raise ConfigError(f"faults.{key}={v} is not a rank of this run (0..{world_size - 1})")
        for key in ("nan_at_iter", "hang_at_iter", "kill_at_iter", "save_error_at_iter"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"faults.{key} must be an iteration >= 1, got {v}")
        if self.slow_s < 0:
            raise ConfigError(f"faults.slow_s must be >= 0, got {self.slow_s}")


def first_attempt() -> bool:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0


def log_dir(cfg) -> Path:
    """Where fault reports go: the metrics file's directory, else TensorBoard's, else checkpoint.save."""
    lg = cfg.logging
    if lg.metrics_file:
        return Path(lg.metrics_file).resolve().parent
    return Path(lg.tensorboard_dir or cfg.checkpoint.save or ".")


def _comm_device():
    from ..device import comm_device

    return comm_device()


def _main_grads(optimizer) -> list:
    grads = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for p in opt.get_parameters():
            g = getattr(p, "decoupled_grad", None)
            g = p.grad if g is None else g
            if g is not None:
                grads.append(g)
    return grads


def install_nonfinite_check(optimizer) -> None:
    """megatron's ``found_inf`` skip for bf16/fp32 too (see the module docstring). Every rank takes the
    same decision: one all-reduce (MAX) of the flag over the world per step."""
    if getattr(optimizer, "_scidfm_nonfinite_check", False):
        return
    import torch

    prepare = optimizer.prepare_grads

    @torch.no_grad()
    def prepare_grads() -> bool:
        found = bool(prepare())  # megatron's own (fp16 loss scaling)
        if not found:
            grads = _main_grads(optimizer)
            if grads:
                norms = torch._foreach_norm(grads)
                found = not bool(torch.isfinite(torch.stack([n.float() for n in norms]).sum()))
        flag = torch.tensor([1.0 if found else 0.0], device=_comm_device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    optimizer.prepare_grads = prepare_grads  # megatron's step() calls self.prepare_grads()
    optimizer._scidfm_nonfinite_check = True


class SpikeDetector:
    """z-score of a loss against the last ``window`` finite losses (needs 10 of them)."""

    def __init__(self, window: int, zscore: float):
        self.zscore = zscore
        self.losses: deque[float] = deque(maxlen=max(window, 2))

    def __call__(self, loss: float) -> Optional[float]:
        z = None
        if self.zscore > 0 and len(self.losses) >= 10:
            mean = statistics.fmean(self.losses)
            sd = statistics.pstdev(self.losses, mean)
            if sd > 0 and (loss - mean) / sd > self.zscore:
                z = (loss - mean) / sd
        self.losses.append(loss)
        return z


class Watchdog:
    """A daemon thread: when ``beat()`` has not been called for the timeout, write every thread's Python
    stack to ``path`` and end the process (exit code 124). The timeout is ``fixed`` seconds, or
    (``fixed`` None) max(HANG_FLOOR_S, HANG_STEP_MULTIPLE x the median time between beats)."""

    def __init__(self, fixed: Optional[float], path: Path, rank: int, poll_s: float = 0.5):
        self.fixed, self.path, self.rank, self.poll_s = fixed, Path(path), rank, poll_s
        self.intervals: deque = deque(maxlen=100)
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scidfm-hang-watchdog", daemon=True)

    def timeout(self) -> float:
        if self.fixed is not None:
            return self.fixed
        med = statistics.median(self.intervals) if self.intervals else 0.0
        return max(HANG_FLOOR_S, HANG_STEP_MULTIPLE * med)

    def start(self) -> "Watchdog":
        self.last = time.monotonic()
        self._thread.start()
        return self

    def beat(self) -> None:
        now = time.monotonic()
        self.intervals.append(now - self.last)
        self.last = now

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import faulthandler

        while not self._stop.wait(self.poll_s):
            waited, limit = time.monotonic() - self.last, self.timeout()
            if waited <= limit:
                continue
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as f:
                f.write(f"rank {self.rank} (pid {os.getpid()}): no training iteration completed for {waited:.1f} s "
                        f"(train.hang_timeout_s: {limit:.1f} s); Python stacks of all threads:\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
            print(f"[scidfm] rank {self.rank}: no training iteration completed in {limit:.0f} s "
                  f"(train.hang_timeout_s); stacks of all threads written to {self.path}; exiting "
                  f"{HANG_EXIT_CODE}", file=sys.stderr, flush=True)
            os._exit(HANG_EXIT_CODE)


class FaultGuard:
    """The trainer's fault handling, in one object: drills, the guarded optimizer step and the NaN
    policy, loss spikes, the hang watchdog, per-rank step times and the save-error policy. Every method
    that communicates is called by every rank at the same point."""

    def __init__(self, cfg, rank: int, world: int, optimizer, model_config, chunks, rank0: bool):
        self.cfg, self.rank, self.world, self.rank0 = cfg, rank, world, rank0
        self.drill = cfg.faults
        self.armed = first_attempt()
        self.optimizer = optimizer
        install_nonfinite_check(optimizer)
        self.skipped = 0
        self.spikes = SpikeDetector(cfg.train.loss_spike_window, cfg.train.loss_spike_zscore)
        self._nan_now = False
        if self.drill.nan_at_iter is not None and self.armed:
            for c in chunks:
                (c.module if hasattr(c, "module") else c).register_forward_hook(self._poison)
        # per-rank step time without the gradient reduction (where fast ranks wait for slow ones)
        self._busy: list[float] = []
        self._reduce_s, self._t0 = 0.0, time.perf_counter()
        fin = getattr(model_config, "finalize_model_grads_func", None)
        if fin is not None and not getattr(fin, "_scidfm_timed", False):
            def timed(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return fin(*args, **kwargs)
                finally:
                    self._reduce_s += time.perf_counter() - t
            timed._scidfm_timed = True  # type: ignore[attr-defined]  # marks the wrapper as ours
            model_config.finalize_model_grads_func = timed
        self._straggler_streak: dict = {}
        self.watchdog: Optional[Watchdog] = None

    # ------------------------------------------------------------------ drills
    def _poison(self, module, args, output):
        import torch

        if self._nan_now and isinstance(output, torch.Tensor) and output.is_floating_point() and output.requires_grad:
            return _NanGrad.apply(output)
        return None

    def _fires(self, key: str, iteration: int, rank_key: Optional[str] = None) -> bool:
        at = getattr(self.drill, key)
        return (self.armed and at is not None and at == iteration
                and (rank_key is None or getattr(self.drill, rank_key) == self.rank))

    def before_step(self, iteration: int) -> None:
        """Start of the step that will be ``iteration``."""
        self._t0, self._reduce_s = time.perf_counter(), 0.0
        self._nan_now = self._fires("nan_at_iter", iteration)
        if self._fires("hang_at_iter", iteration, "hang_rank"):
            print(f"[scidfm] faults.hang_at_iter: rank {self.rank} hangs in iteration {iteration}", file=sys.stderr,
                  flush=True)
            while True:
                time.sleep(3600)
        if self.drill.slow_rank == self.rank and self.drill.slow_s and self.armed:
            time.sleep(self.drill.slow_s)

    # ------------------------------------------------------------------ the step
    def optimizer_step(self, iteration: int, r):
        """After forward/backward (``train_step(..., step_optimizer=False)``): the kill drill, then the
        optimizer step unless the loss or a gradient is not finite. Returns ``r`` with grad_norm and
        update_successful filled in."""
        if self._fires("kill_at_iter", iteration, "kill_rank"):
            print(f"[scidfm] faults.kill_at_iter: rank {self.rank} kills itself (SIGKILL) in iteration {iteration}",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        self._nan_now = False
        if r.loss is not None and not math.isfinite(r.loss):  # global: reduced over DP, broadcast over PP
            r.update_successful, r.grad_norm = False, None
        else:
            ok, grad_norm, _ = self.optimizer.step()
            r.update_successful = bool(ok)
            r.grad_norm = None if grad_norm is None else float(grad_norm)
        self._busy.append(time.perf_counter() - self._t0 - self._reduce_s)
        return r

    def check(self, iteration: int, r, first_sample: int, samples: int, last_checkpoint, finalize: Callable) -> dict:
        """The NaN/Inf policy and the spike log for the step just counted. Returns extra metrics fields;
        raises :class:`RunStopped` (every rank) when the run must stop."""
        t = self.cfg.train
        where = f"samples {first_sample}..{first_sample + samples - 1}"
        if r.update_successful and r.loss is not None and math.isfinite(r.loss):
            z = self.spikes(r.loss)
            if z is not None:
                if self.rank0:
                    log.warning("iteration %d: loss spike %.4f (z-score %.1f over the last %d losses; %s)", iteration,
                                r.loss, z, len(self.spikes.losses) - 1, where)
                return {"loss_spike_z": z}
            return {}
        what = (f"loss {r.loss} not finite" if r.loss is None or not math.isfinite(r.loss)
                else f"gradients not finite, loss {r.loss:.4f}")
        if t.on_nan == "skip" and self.skipped < t.max_skipped_steps:
            self.skipped += 1
            if self.rank0:
                print(f"[scidfm] iteration {iteration} skipped: {what} ({where}); weights and optimizer "
                      f"state unchanged; {self.skipped} of train.max_skipped_steps={t.max_skipped_steps} skipped",
                      flush=True)
            return {"skipped": True, "first_sample": first_sample, "samples": samples}
        finalize()  # a save still in flight is published: the last good checkpoint is the newest
        why = (f"more than train.max_skipped_steps={t.max_skipped_steps} skipped steps" if t.on_nan == "skip"
               else "train.on_nan=stop")
        raise RunStopped(f"iteration {iteration}: {what} ({where}); the step was not applied "
                         f"({why}); last good checkpoint: {last_checkpoint or 'none saved yet'}. Resume it with a "
                         f"lower train.lr (a resume applies the recipe's LR schedule), or "
                         f"resume with train.on_nan=skip")

    # ------------------------------------------------------------------ stragglers
    def straggler_stats(self) -> dict:
        """Collective: every rank's mean step time (without the gradient reduction) since the last call."""
        import torch

        mine = statistics.fmean(self._busy) if self._busy else 0.0
        self._busy = []
        times = torch.zeros(self.world, dtype=torch.float64, device=_comm_device())
        times[self.rank] = mine
        if torch.distributed.is_initialized() and self.world > 1:
            torch.distributed.all_reduce(times)
        ts = times.tolist()
        med = statistics.median(ts)
        slowest = max(range(len(ts)), key=ts.__getitem__)
        out = dict(rank_step_s_min=min(ts), rank_step_s_median=med, rank_step_s_max=ts[slowest], slowest_rank=slowest)
        if self.rank0 and med > 0 and ts[slowest] > STRAGGLER_RATIO * med:
            log.warning("straggler: rank %d took %.3f s per step over the last log interval, %.2fx the median "
                        "%.3f s of %d ranks (step time without the gradient reduction)", slowest, ts[slowest],
                        ts[slowest] / med, med, len(ts))
        return out

    # ------------------------------------------------------------------ hangs
    def start_watchdog(self) -> None:
        t = self.cfg.train
        if t.hang_timeout_s == 0:
            return
        path = log_dir(self.cfg) / f"hang-stacks-rank{self.rank}.txt"
        self.watchdog = Watchdog(t.hang_timeout_s, path, self.rank).start()

    def beat(self) -> None:
        if self.watchdog is not None:
            self.watchdog.beat()

    def stop_watchdog(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None

    # ------------------------------------------------------------------ saves
    def save_error(self, iteration: int) -> Optional[OSError]:
        """The drill's error for this rank's save at ``iteration`` (None: no drill)."""
        if self._fires("save_error_at_iter", iteration, "save_error_rank"):
            return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (faults.save_error_at_iter drill, rank "
                                         f"{self.rank})")
        return None

    def on_save_error(self, exc: "SaveFailed", iteration: int) -> None:
        policy = self.cfg.checkpoint.on_save_error
        if policy == "stop":
            raise RunStopped(f"checkpoint save at iteration {iteration} failed: {exc}; checkpoint.on_save_error=stop "
                             f"(continue retries at the next checkpoint.save_interval)")
        if self.rank0:
            log.warning("checkpoint save at iteration %d failed: %s; checkpoint.on_save_error=continue: training "
                        "goes on, the next save interval tries again", iteration, exc)


def _nan_grad_class():
    import torch

    class NanGrad(torch.autograd.Function):
        """Identity forward; NaN gradient backward (the NaN drill: a step whose gradients overflow)."""

        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    return NanGrad


class _LazyNanGrad:
    def apply(self, x):
        global _NanGradCls
        if _NanGradCls is None:
            _NanGradCls = _nan_grad_class()
        return _NanGradCls.apply(x)


_NanGradCls = None
_NanGrad = _LazyNanGrad()


def disk_free_check(root: Path, expected: int) -> Optional[OSError]:
    """ENOSPC if the file system of ``root`` has less than ``expected`` bytes free."""
    import shutil

    probe = Path(root)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < expected:
        return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {free / 2**30:.2f} GiB free on {probe}, the "
                                     f"checkpoint needs about {expected / 2**30:.2f} GiB (the previous one's size)")
    return None


def dir_size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total
