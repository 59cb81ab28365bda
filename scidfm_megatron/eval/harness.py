"""Evaluate a model (Hugging Face folder or megatron checkpoint) on zero-shot tasks; JSON + the paper's tables.

    scidfm-evaluate --model hf/tiny --task sciq --data sciq.jsonl [--limit 100] [--output results.json]
    scidfm-evaluate --model runs/tiny/sft --task mol_design=examples/eval/data/molecule_generation.jsonl
    scidfm-evaluate --model hf/scidfm --suite paper --data-dir tasks/ --output results.json

``--task`` may repeat with one ``--data`` each; ``--task NAME=FILE`` pairs them explicitly. ``--suite paper``
runs every task whose file ``<task>.jsonl`` is in ``--data-dir`` (as ``scidfm-eval-data`` names them) and
prints Tables 4, 7, 8 and 9 in the paper's layout beside the paper's SciDFM row.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

from .tasks import TASKS, TaskDataError, load_records, run_task

# The paper's SciDFM rows (../shared/SCIDFM.md; Sun et al. 2024).
PAPER: dict[str, dict[str, Any]] = {  # a figure, or Table 8's row of six
    "Table 4": {"scieval": 62.48, "sciq": 88.00, "arc_challenge": 64.76, "arc_easy": 81.48, "gsm8k": 59.14,
                "math": 27.28, "medqa": 44.54, "medmcqa": 53.10, "pubmedqa": 78.00},
    "Table 7": {"bace": 76.4, "bbbp": 64.8, "clintox": 98.5, "hiv": 71.5, "tox21": 75.6},
    "Table 8": {"mol_design": (0.084, 43.414, 0.586, 0.704, 0.443, 0.994),
                "reagent_prediction": (0.192, 17.527, 0.476, 0.576, 0.452, 0.999),
                "retrosynthesis": (0.665, 6.45, 0.916, 0.937, 0.888, 0.998)},
    "Table 9": {"protein_function": 0.60, "functional_description": 0.72, "catalytic_activity": 0.76,
                "domain_motif": 0.55},
}
_T8_COLS = [("exact", "Exact"), ("levenshtein", "Levenshtein"), ("rdk_fts", "RDK FTS"), ("maccs_fts", "MACCS FTS"),
            ("morgan_fts", "Morgan FTS"), ("validity", "Validity")]
# Columns of the tasks outside the paper's tables (e.g. mmlu, the generic task names), per kind.
_COLUMNS = {
    "multiple_choice": [("acc", "Acc %"), ("acc_norm", "Acc-norm %")],
    "math": [("acc", "Acc %")],
    "molecule_generation": _T8_COLS,
    "protein_understanding": [("rouge_l", "ROUGE-L")],
    "moleculenet": [("auc_roc", "AUC-ROC %")],
}


def evaluate(model, tasks: list[tuple[str, str]], *, limit: Optional[int] = None, batch_size: int = 8,
             progress: bool = True, max_new_tokens: Optional[int] = None, prompt_format: str = "chat",
             molecule_convention: str = "mol_instructions", strict: bool = False) -> dict:
    """``tasks``: (task name, data file) pairs. Returns {task: {kind, n, metrics, samples, seconds, rejected,
    ...}}: ``rejected`` lists the task file's bad lines (``file:line: reason``), skipped unless ``strict``."""
    out = {}
    for name, data in tasks:
        if name not in TASKS:
            raise TaskDataError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
        task = TASKS[name]
        rejected: list = []
        recs = load_records(data, task.kind, limit, strict=strict, rejected=rejected)
        for r in rejected:
            print(f"[scidfm] {name}: skipped {r}", file=sys.stderr)
        t0 = time.time()
        scores, samples = run_task(model, task, recs, batch_size=batch_size, progress=progress,
                                   max_new_tokens=max_new_tokens, prompt_format=prompt_format,
                                   molecule_convention=molecule_convention)
        splits = sorted({str(r["split"]) for r in recs if r.get("split")})  # e.g. PubMedQA's test / all labelled
        out[name] = dict(kind=task.kind, paper_table=task.paper_table, data=str(data), n=len(recs),
                         split=", ".join(splits) or None,
                         prompt_format=prompt_format, metrics=scores, samples=samples, rejected=rejected,
                         seconds=round(time.time() - t0, 2))
    return out


def _fmt(x, digits=4) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _grid(title: str, head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    return [title, "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=False))] + \
        ["  ".join(x.ljust(w) for x, w in zip(r, widths, strict=False)) for r in rows] + [""]


def _table4_cell(r) -> str:
    m = r["metrics"]
    if r["kind"] == "math" and "strict_match" in m:
        return f"{m['strict_match']:.2f}/{m['flexible_extract']:.2f}"
    return f"{m['acc']:.2f}"


def format_table(results: dict) -> str:
    """The paper's Tables 4, 7, 8 and 9 for the tasks present (this model beside the paper's SciDFM row),
    then one block per kind for tasks outside those tables."""
    lines = []
    t4 = [n for n in PAPER["Table 4"] if n in results]
    if t4:
        head = ["Table 4 (acc %)"] + [TASKS[n].paper_name for n in t4]
        rows = [["SciDFM (paper)"] + [f"{PAPER['Table 4'][n]:.2f}" for n in t4],
                ["this model"] + [_table4_cell(results[n]) for n in t4],
                ["n"] + [str(results[n]["n"]) + (f" ({results[n]['split']})" if results[n].get("split") else "")
                         for n in t4]]
        lines += _grid("Table 4: general and domain benchmarks, zero-shot accuracy % (GSM8K: lm-eval "
                       "strict-match/flexible-extract)", head, rows)
    t7 = [n for n in PAPER["Table 7"] if n in results]
    if t7:
        ours = [results[n]["metrics"]["auc_roc"] for n in t7]
        paper = [PAPER["Table 7"][n] for n in t7]
        head = ["Table 7 (AUC-ROC %)"] + [TASKS[n].paper_name for n in t7] + ["average"]
        rows = [["SciDFM (paper)"] + [f"{x:.1f}" for x in paper] + [f"{sum(paper) / len(paper):.1f}"],
                ["this model"] + [f"{x:.1f}" for x in ours] + [f"{sum(ours) / len(ours):.1f}"],
                ["tasks"] + [str(len(results[n]["metrics"]["auc_per_task"])) for n in t7] + [""]]
        note = "" if len(t7) == 5 else f" (average over the {len(t7)} datasets present)"
        lines += _grid(f"Table 7: MoleculeNet, AUC-ROC % (multi-task sets: mean of per-task AUCs){note}", head, rows)
    t8 = [n for n in PAPER["Table 8"] if n in results] + \
         [n for n in ("forward_reaction_prediction",) if n in results]
    if t8:
        rows = []
        for n in t8:
            if n in PAPER["Table 8"]:
                rows.append([TASKS[n].paper_name, "SciDFM (paper)"] + [str(x) for x in PAPER["Table 8"][n]])
            m = results[n]["metrics"]
            rows.append([TASKS[n].paper_name, f"this model (n={results[n]['n']})"] + [_fmt(m[k]) for k, _ in _T8_COLS])
        conv = {results[n]["metrics"].get("convention") for n in t8}
        lines += _grid(f"Table 8: Mol-Instructions molecule generation (scoring: {', '.join(sorted(conv))})",
                       ["task", "row"] + [c for _, c in _T8_COLS], rows)
    t9 = [n for n in PAPER["Table 9"] if n in results]
    if t9:
        head = ["Table 9 (ROUGE-L)"] + [TASKS[n].paper_name for n in t9]
        rows = [["SciDFM (paper)"] + [f"{PAPER['Table 9'][n]:.2f}" for n in t9],
                ["this model"] + [f"{results[n]['metrics']['rouge_l']:.2f}" for n in t9],
                ["n"] + [str(results[n]["n"]) for n in t9]]
        lines += _grid("Table 9: Mol-Instructions protein understanding, ROUGE-L", head, rows)
    in_paper = set(t4) | set(t7) | set(t8) | set(t9)
    for kind, cols in _COLUMNS.items():
        others = [(n, r) for n, r in results.items() if r["kind"] == kind and n not in in_paper]
        if not others:
            continue
        body = [[n, str(r["n"])] + [_fmt(r["metrics"][k]) for k, _ in cols] for n, r in others]
        lines += _grid(f"{kind} (tasks outside the paper's tables)", ["task", "n"] + [c for _, c in cols], body)
    return "\n".join(lines)


def suite_tasks(data_dir: str | Path) -> list[tuple[str, str]]:
    """(task, file) for every ``<task>.jsonl`` of a known task in ``data_dir`` (paper tasks first)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise TaskDataError(f"{d}: --data-dir is not a directory")
    found = [(n, str(d / f"{n}.jsonl")) for n in TASKS if (d / f"{n}.jsonl").is_file()]
    if not found:
        raise TaskDataError(f"{d}: no task files; expected <task>.jsonl for tasks among {sorted(TASKS)} "
                            "(scidfm-eval-data writes them)")
    return found
