"""Evaluate a model (Hugging Face folder or megatron checkpoint) on zero-shot tasks; JSON + paper table.

    scidfm-evaluate --model hf/tiny --task sciq --data sciq.jsonl [--limit 100] [--output results.json]
    scidfm-evaluate --model runs/tiny/sft --task mol_instructions_molecule --data examples/eval/data/molecule_generation.jsonl

``--task`` may repeat with one ``--data`` each; ``--task NAME=FILE`` pairs them explicitly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

from .tasks import TASKS, TaskDataError, load_records, run_task

# Column order of the paper's tables, per kind.
_COLUMNS = {
    "multiple_choice": [("acc", "Acc %"), ("acc_norm", "Acc-norm %")],
    "math": [("acc", "Acc %")],
    "molecule_generation": [("exact", "Exact"), ("levenshtein", "Levenshtein"), ("rdk_fts", "RDK FTS"),
                            ("maccs_fts", "MACCS FTS"), ("morgan_fts", "Morgan FTS"), ("validity", "Validity")],
    "protein_understanding": [("rouge_l", "ROUGE-L")],
    "moleculenet": [("auc_roc", "AUC-ROC %")],
}


def evaluate(model, tasks: list[tuple[str, str]], *, limit: Optional[int] = None, batch_size: int = 8,
             progress: bool = True, max_new_tokens: Optional[int] = None) -> dict:
    """``tasks``: (task name, data file) pairs. Returns {task: {kind, n, metrics, samples, seconds}}."""
    out = {}
    for name, data in tasks:
        if name not in TASKS:
            raise TaskDataError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
        task = TASKS[name]
        recs = load_records(data, task.kind, limit)
        t0 = time.time()
        scores, samples = run_task(model, task, recs, batch_size=batch_size, progress=progress,
                                   max_new_tokens=max_new_tokens)
        out[name] = dict(kind=task.kind, paper_table=task.paper_table, data=str(data), n=len(recs), metrics=scores,
                         samples=samples, seconds=round(time.time() - t0, 2))
    return out


def format_table(results: dict) -> str:
    """One block per task kind, columns as in the paper's tables."""
    lines = []
    for kind, cols in _COLUMNS.items():
        rows = [(n, r) for n, r in results.items() if r["kind"] == kind]
        if not rows:
            continue
        head = ["task", "n"] + [c for _, c in cols]
        body = [[n, str(r["n"])] + [f"{r['metrics'][k]:.4g}" for k, _ in cols] for n, r in rows]
        widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
        lines.append(f"{kind} ({rows[0][1]['paper_table']})")
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        lines.extend("  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in body)
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scidfm-evaluate", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", required=True, help="Hugging Face folder or megatron checkpoint")
    ap.add_argument("--task", action="append", required=True, help=f"one of {sorted(TASKS)} (or NAME=FILE)")
    ap.add_argument("--data", action="append", default=[], help="JSONL file, one per --task")
    ap.add_argument("--limit", type=int, default=None, help="first N records of each file")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="generation tasks (default per kind)")
    ap.add_argument("--tokenizer", default=None, help="megatron checkpoints: tokenizer (default: the run's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", default=None, help="write results (with per-sample details) as JSON here")
    args = ap.parse_args(argv)
    pairs = []
    data = list(args.data)
    for t in args.task:
        if "=" in t:
            name, f = t.split("=", 1)
        else:
            if not data:
                ap.error(f"--task {t} has no --data file (give one --data per --task, or --task NAME=FILE)")
            name, f = t, data.pop(0)
        pairs.append((name, f))
    from ..config import ConfigError
    from .._errors import conversion_errors
    from .models import load_model

    try:
        for name, f in pairs:  # fail on bad input before loading the model
            if name not in TASKS:
                raise TaskDataError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
            load_records(f, TASKS[name].kind, args.limit)
        model = load_model(args.model, tokenizer=args.tokenizer, device=args.device)
        try:
            results = evaluate(model, pairs, limit=args.limit, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens)
        finally:
            model.close()
    except (TaskDataError, FileNotFoundError, ConfigError) + conversion_errors() as exc:
        print(f"scidfm-evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.output:
        from ..utils import atomic_write

        atomic_write(Path(args.output), json.dumps(dict(model=str(args.model), results=results), indent=1))
        print(f"[scidfm] results -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
