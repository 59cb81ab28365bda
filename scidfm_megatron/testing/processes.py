"""The GPU check's subprocesses: each in its own session with its output in a log file, killed as a tree
(torchrun's workers included) on a timeout or at exit, under one global time budget. Standard library only
at import (the check reports a library that does not import; it does not crash on it)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Optional

from .distributed import _kill_group, cpu_env

ROOT = Path(__file__).resolve().parents[2]  # the repository: the children's working directory

LOG_DIR: Optional[Path] = None  # where every torchrun below a child streams its log: set by configure()
CPU_ONLY = False  # the dry run: TorchDynamo off in the children (set by configure())


def configure(cpu_only: bool, log_dir: Path) -> None:
    global CPU_ONLY, LOG_DIR
    CPU_ONLY, LOG_DIR = cpu_only, log_dir


def child_env(extra: Optional[dict] = None) -> dict:
    """cpu_env (testing/distributed.py) with TorchDynamo disabled in the dry run only (on the GPU megatron's
    jit_fuser, torch.compile, and the compiled kernel rows run as a user's run would), and every torchrun
    launched below streaming its log into LOG_DIR (SCIDFM_TORCHRUN_LOG_DIR), so a run stopped at the budget
    still leaves its diagnosis."""
    env = cpu_env({"SCIDFM_TORCHRUN_LOG_DIR": str(LOG_DIR)} if LOG_DIR is not None else None, dynamo_off=CPU_ONLY)
    env.update(extra or {})
    return env


class CheckFailed(Exception):
    """A check ran and its assertion failed (or a step it needs failed): the message is the error text."""


class OutOfTime(CheckFailed):
    pass


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, cap: float) -> float:
        t = min(cap, self.left())
        if t < 5:
            raise OutOfTime(f"not run (or not finished): the global time budget is spent "
                            f"({self.left():.0f} s left)")
        return t


_LIVE: list = []


class Proc:
    """A subprocess in its own session, output to a log file; killed as a tree on timeout or exit."""

    def __init__(self, cmd: list, log: Path, env: Optional[dict] = None, cwd: Optional[Path] = None):
        self.cmd = [str(c) for c in cmd]
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(log, "w")
        self._fh.write("$ " + " ".join(self.cmd) + "\n")
        self._fh.flush()
        self.p = subprocess.Popen(self.cmd, cwd=cwd or ROOT, env=env or child_env(), stdout=self._fh,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        _LIVE.append(self)

    def poll(self):
        return self.p.poll()

    def wait(self, timeout: float) -> int:
        try:
            rc = self.p.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            raise CheckFailed(f"timed out after {timeout:.0f} s: {' '.join(self.cmd[-6:])}\n{self.tail()}") from None
        finally:
            self._fh.close()
        return rc

    def kill(self) -> None:
        """SIGKILL to the launcher and every process below it (no handler runs anywhere)."""
        _kill_group(self.p)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 3000) -> str:
        return self.output()[-n:]


def kill_all() -> None:
    for pr in _LIVE:
        if pr.p.poll() is None:
            pr.kill()


def run(cmd: list, log: Path, budget: Budget, cap: float, env: Optional[dict] = None, check: bool = True) -> Proc:
    pr = Proc(cmd, log, env)
    rc = pr.wait(budget.timeout(cap))
    if check and rc != 0:
        raise CheckFailed(f"exited {rc}: {' '.join(pr.cmd[-8:])}\n{pr.tail()}")
    return pr


def run_pair(cmds: list, logs: list, budget: Budget, cap: float) -> list:
    """Independent runs side by side (each is one process on one core, or a tiny model on the GPU)."""
    t = budget.timeout(cap)
    procs = [Proc(c, log) for c, log in zip(cmds, logs, strict=False)]
    errors = []
    end = time.monotonic() + t
    for pr in procs:
        try:
            rc = pr.wait(end - time.monotonic())
            if rc != 0:
                errors.append(f"exited {rc}: {pr.log.name}\n{pr.tail()}")
        except CheckFailed as exc:
            errors.append(str(exc))
    if errors:
        raise CheckFailed("\n".join(errors))
    return procs
