"""``train.deterministic: true``: bitwise-reproducible steps, and every op that cannot be is named.

PyTorch's deterministic mode with ``warn_only=True`` keeps a run going through an op that has no
deterministic implementation (an atomic-add scatter on CUDA, ...), but its warning is what tells why two runs
differ. The project's launchers set ``PYTHONWARNINGS=ignore``: this installs a filter ahead of that one, so
each such op's warning ("<op> does not have a deterministic implementation ...") is printed once per run.
The GPU check collects the names from the logs (``testing/gpu_check.py``, ``nondeterministic_ops``).
"""

from __future__ import annotations

import os
import re
import warnings

NONDETERMINISTIC = re.compile(r"(\S+) does not have a deterministic implementation")


def enable_deterministic() -> None:
    """Deterministic algorithms (warn, not raise), a fixed cuBLAS workspace (before the first cuBLAS call),
    and the non-determinism warnings shown once each whatever the warning filters say."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    warnings.filterwarnings("once", message=r".*does not have a deterministic implementation")


def nondeterministic_ops(log: str) -> list[str]:
    """The op names those warnings name in a log."""
    return sorted(set(NONDETERMINISTIC.findall(log)))
