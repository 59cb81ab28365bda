"""Launch a script under torchrun on this machine (CPU + gloo) and fail with the log tail if it fails.

Each launch pays megatron-core's import cost (~5 s per process), so tests launch once per layout and
check several things per launch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..parallel import free_port  # tests import it from here too


def cpu_env(extra: dict | None = None, *, dynamo_off: bool | None = None) -> dict:
    """The environment of a launched process. TorchDynamo is disabled where there is no CUDA only (megatron's
    jit_fuser is torch.compile: slow to compile and nothing gained on the CPU; on a GPU it is the run's
    speed, so a benchmark there runs compiled, as a user's run does); ``dynamo_off`` decides instead (the
    GPU check: its dry run), without importing torch."""
    if dynamo_off is None:
        import torch

        dynamo_off = not torch.cuda.is_available()
    # A launcher inherits nothing of an earlier in-process rendezvous (MASTER_PORT of a dead store...).
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    if dynamo_off:
        env["TORCHDYNAMO_DISABLE"] = "1"
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def _kill_group(proc) -> None:
    """Stop a launcher started in its own session and every process below it (torchrun starts its workers
    in sessions of their own, so the launcher's process group is not enough)."""
    import signal

    import psutil

    try:
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


class TorchrunError(RuntimeError):
    """A torchrun launch failed; ``output`` holds every rank's combined stdout and stderr."""

    def __init__(self, message: str, output: str):
        super().__init__(message)
        self.output = output


def root_cause(output: str) -> str:
    """The first exception line a rank printed (torchrun's own summary comes after it)."""
    import re

    for line in output.splitlines():
        if re.match(r"^(\[rank\d+\]: )?[A-Za-z_.]*(Error|Exception)\b", line) and "ChildFailedError" not in line:
            return line
    return ""


def _log_path(script, args) -> Path:
    """A new file in $SCIDFM_TORCHRUN_LOG_DIR named after the launched script or module."""
    import time

    d = Path(os.environ["SCIDFM_TORCHRUN_LOG_DIR"])
    d.mkdir(parents=True, exist_ok=True)
    name = (str(args[0]) if str(script) == "-m" and args else Path(str(script)).stem).replace(".", "_")
    stamp = time.strftime("%H%M%S")
    for i in range(1000):
        p = d / f"torchrun_{name}_{stamp}_{i}.log"
        if not p.exists():
            return p
    raise RuntimeError(f"no free log name in {d}")


def run_torchrun(script: str | Path, nproc: int, args: list[str], *, timeout: float = 900,
                 env: dict | None = None, nnodes: int = 1, cwd: str | None = None,
                 log: str | Path | None = None) -> str:
    """Run ``torchrun --standalone --nproc-per-node nproc script args``; return combined output.

    The output goes to a file *as it runs*: ``log``, else a new file in $SCIDFM_TORCHRUN_LOG_DIR when set
    (the GPU check sets it: a benchmark stopped at its budget leaves every rank's log so far), else a
    temporary file removed afterwards."""
    import tempfile

    target = ["-m"] if str(script) == "-m" else [str(script)]  # "-m" runs the module named first in args
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", *target, *map(str, args)]
    if log is None and os.environ.get("SCIDFM_TORCHRUN_LOG_DIR"):
        log = _log_path(script, args)
    keep = log is not None
    if log is None:
        fd, log = tempfile.mkstemp(prefix="torchrun_", suffix=".log")
        os.close(fd)
    log = Path(log)
    try:
        with open(log, "w") as fh:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            proc = subprocess.Popen(cmd, env=cpu_env(env), cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except BaseException:  # timeout, KeyboardInterrupt, SIGTERM turned into an exception: no orphans
                _kill_group(proc)
                raise
        out = log.read_text(errors="replace").split("\n", 1)[1]
    finally:
        if not keep:
            log.unlink(missing_ok=True)
    if rc != 0:
        tail = "\n".join(out.splitlines()[-40:])
        raise TorchrunError(f"torchrun {Path(script).name} {' '.join(map(str, args))} on {nproc} processes "
                            f"exited {rc}; root cause: {root_cause(out)}\n{tail}", out)
    return out


def write_report(path: str, report) -> None:
    """Workers: rank 0 writes ``report`` as JSON at ``path`` (temporary name, then rename); every rank
    waits for it, then the process group ends."""
    import json

    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(f"{path}.tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(f"{path}.tmp", path)
    dist.barrier()
    dist.destroy_process_group()
