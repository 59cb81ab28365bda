"""``python -m scidfm_megatron.cli.lm_eval_local``: lm-eval on a converted checkpoint, offline (the runner:
eval/lm_eval_local.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..eval import lm_eval_local
from ..eval.lm_eval_local import TASK, run_lm_eval

DOC = lm_eval_local.__doc__ or ""


def main(argv: list[str] | None = None) -> int:
    """Score the local multiple-choice file with lm-eval; print acc / acc_norm (and write them with --json)."""
    p = argparse.ArgumentParser(prog="python -m scidfm_megatron.cli.lm_eval_local", description=DOC.split("\n")[0])
    p.add_argument("--model", required=True, help="converted Hugging Face model folder")
    p.add_argument("--data", required=True, help='JSONL of {"question", "choices", "answer"}')
    p.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default 4)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 (torch dtype name)")
    p.add_argument("--task-dir", default=None, help=f"folder holding {TASK}.yaml (default: examples/eval/lm_eval)")
    p.add_argument("--json", default=None, help="also write the result (without per-question samples) here")
    a = p.parse_args(argv)
    from ..errors import ScidfmError

    try:
        res = run_lm_eval(a.model, a.data, limit=a.limit, batch_size=a.batch_size, device=a.device, dtype=a.dtype,
                          task_dir=a.task_dir)
    except (ScidfmError, FileNotFoundError) as exc:  # a missing model, data or task folder: one line
        print(f"lm_eval_local: error: {exc}", file=sys.stderr)
        return 2
    if not res:
        return 0
    print(f"{res['task']}: acc={res['acc']:.4f} acc_norm={res['acc_norm']:.4f} n={res['n']}")
    if a.json:
        Path(a.json).write_text(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
