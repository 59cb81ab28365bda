"""Launch a script under torchrun on this machine (CPU + gloo) and fail with the log tail if it fails.

Each launch pays megatron-core's import cost (~5 s per process), so tests launch once per layout and
check several things per launch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..parallel import free_port  # noqa: F401  (tests import it from here)


def cpu_env(extra: dict | None = None) -> dict:
    # A launcher inherits nothing of an earlier in-process rendezvous (MASTER_PORT of a dead store...).
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONWARNINGS="ignore",
               PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


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


def run_torchrun(script: str | Path, nproc: int, args: list[str], *, timeout: float = 900,
                 env: dict | None = None, nnodes: int = 1, cwd: str | None = None) -> str:
    """Run ``torchrun --standalone --nproc-per-node nproc script args``; return combined output."""
    target = ["-m"] if str(script) == "-m" else [str(script)]  # "-m" runs the module named first in args
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", *target, *map(str, args)]
    proc = subprocess.run(cmd, env=cpu_env(env), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(out.splitlines()[-40:])
        raise TorchrunError(f"torchrun {Path(script).name} {' '.join(map(str, args))} on {nproc} processes "
                            f"exited {proc.returncode}; root cause: {root_cause(out)}\n{tail}", out)
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
