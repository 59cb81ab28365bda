"""What tests, benchmarks and the GPU check share about runs: the command line of a console script, the
losses a training run logged."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def console_script(name: str) -> list[str]:
    """The command line of the installed console script ``name`` (setup.py's ``console_scripts``, e.g.
    ``scidfm-convert``): the one beside this interpreter (its venv's bin/), else the one on PATH."""
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return [str(exe)]
    found = shutil.which(name)
    if found:
        return [found]
    raise FileNotFoundError(f"console script {name} is not installed beside {sys.executable} nor on PATH: "
                            f"install the project (pip install -e ., as scripts/setup_env.sh does)")


def train_losses(path: str | Path, *, tolerant: bool = False) -> dict[int, float]:
    """{iteration: loss} of the training steps in a metrics file (``path``, or ``path/metrics.jsonl`` for a
    run's work directory); a resumed run's rows replace the earlier ones. ``tolerant``: for a run killed
    with SIGKILL, a line it left cut is skipped and a missing file reads as no losses."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if tolerant and not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if tolerant:
                continue
            raise
        if row.get("phase") == "train":
            out[int(row["iteration"])] = row["loss"]
    return out
