"""``scidfm-evaluate``: zero-shot tasks on a model, JSON and the paper's tables (the harness: eval/harness.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..eval import harness
from ..eval.harness import evaluate, format_table, suite_tasks
from ..eval.metrics import MOLECULE_CONVENTIONS
from ..eval.tasks import PROMPT_FORMATS, TASKS, TaskDataError, load_records

DOC = harness.__doc__ or ""  # the library module's usage text is the --help text


def main(argv=None) -> int:
    """Parse ``scidfm-evaluate``'s arguments, check every task file before loading the model, print the tables."""
    ap = argparse.ArgumentParser(prog="scidfm-evaluate", description=DOC.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DOC)
    ap.add_argument("--model", required=True, help="Hugging Face folder or megatron checkpoint")
    ap.add_argument("--task", action="append", default=[], help=f"one of {sorted(TASKS)} (or NAME=FILE)")
    ap.add_argument("--data", action="append", default=[], help="JSONL file, one per --task")
    ap.add_argument("--suite", choices=["paper"], default=None, help="every task file found in --data-dir")
    ap.add_argument("--data-dir", default=None, help="with --suite: folder of <task>.jsonl files")
    ap.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="chat",
                    help="chat: the SFT chat template (instruction-tuned models); raw: plain text (base models)")
    ap.add_argument("--molecule-scoring", choices=MOLECULE_CONVENTIONS, default="mol_instructions",
                    help="molecule generation: Mol-Instructions' pipeline (Table 8) or MolT5's scripts")
    ap.add_argument("--limit", type=int, default=None, help="first N records of each file")
    ap.add_argument("--strict", action="store_true",
                    help="stop at the first bad task-file line (default: skip it, list it, keep every good line)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="generation tasks (default per kind)")
    ap.add_argument("--tokenizer", default=None, help="megatron checkpoints: tokenizer (default: the run's)")
    ap.add_argument("--device", default="cpu", help="Hugging Face models: torch device, e.g. cuda (default cpu)")
    ap.add_argument("--output", default=None, help="write results (with per-sample details) as JSON here")
    args = ap.parse_args(argv)
    if args.suite and args.task:
        ap.error("give either --suite paper --data-dir DIR or --task, not both")
    if args.suite and not args.data_dir:
        ap.error("--suite paper needs --data-dir (a folder of <task>.jsonl files)")
    if not args.suite and not args.task:
        ap.error("give --task NAME --data FILE (repeatable) or --suite paper --data-dir DIR")
    from ..errors import ScidfmError
    from ..eval.models import load_model

    try:
        if args.suite:
            pairs = suite_tasks(args.data_dir)
        else:
            pairs, data = [], list(args.data)
            for t in args.task:
                if "=" in t:
                    name, f = t.split("=", 1)
                else:
                    if not data:
                        ap.error(f"--task {t} has no --data file (give one --data per --task, or --task NAME=FILE)")
                    name, f = t, data.pop(0)
                pairs.append((name, f))
        for name, f in pairs:  # fail on bad input before loading the model
            if name not in TASKS:
                raise TaskDataError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
            load_records(f, TASKS[name].kind, args.limit, strict=args.strict)
        model = load_model(args.model, tokenizer=args.tokenizer, device=args.device)
        try:
            results = evaluate(model, pairs, limit=args.limit, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, prompt_format=args.prompt_format,
                               molecule_convention=args.molecule_scoring, strict=args.strict)
        finally:
            model.close()
    except (ScidfmError, FileNotFoundError) as exc:  # bad task data, model folder or config: one line
        print(f"scidfm-evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(results))
    print(f"[scidfm] prompt format: {args.prompt_format}; molecule scoring: {args.molecule_scoring}")
    if args.output:
        from ..utils import atomic_write

        atomic_write(Path(args.output), json.dumps(dict(model=str(args.model), prompt_format=args.prompt_format,
                                                        molecule_scoring=args.molecule_scoring, results=results),
                                                   indent=1))
        print(f"[scidfm] results -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
