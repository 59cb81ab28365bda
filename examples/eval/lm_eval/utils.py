"""Loader for the ``scidfm_science_mc`` lm-eval task (see scidfm_science_mc.yaml next to this file).

lm-eval calls ``custom_dataset(**metadata, **dataset_kwargs)``; ``metadata`` holds the model arguments
(pretrained=..., dtype=...) as well as anything passed with ``--metadata``, hence the ``**_``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV_VAR = "SCIDFM_MC_DATA"
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "multiple_choice.jsonl"


def resolve_data_file(data_file: str | os.PathLike | None = None) -> Path:
    """``data_file`` argument, else $SCIDFM_MC_DATA, else the repository's examples/eval/data file."""
    path = data_file or os.environ.get(ENV_VAR) or DEFAULT_DATA
    return Path(path).expanduser().resolve()


def read_multiple_choice(path: str | os.PathLike) -> list[dict]:
    """Read and validate the JSONL file; errors name the line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            q, choices, answer = doc.get("question"), doc.get("choices"), doc.get("answer")
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"{where}: 'question' must be a non-empty string")
            if (not isinstance(choices, list) or len(choices) < 2
                    or not all(isinstance(c, str) and c for c in choices)):
                raise ValueError(f"{where}: 'choices' must be a list of at least two non-empty strings")
            if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise ValueError(f"{where}: 'answer' must be an int index into 'choices' (0..{len(choices) - 1})")
            rows.append({"question": q, "choices": choices, "answer": answer})
    if not rows:
        raise ValueError(f"{path}: no questions")
    return rows


def load_multiple_choice(data_file: str | None = None, **_):
    """lm-eval ``custom_dataset`` hook: a DatasetDict with one ``test`` split, built in memory (no hub access)."""
    import datasets

    path = resolve_data_file(data_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"multiple-choice data file not found: {path} (pass --metadata '{{\"data_file\": \"...\"}}' "
            f"or set {ENV_VAR})")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_multiple_choice(path))})
