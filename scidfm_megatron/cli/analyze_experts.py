"""``scidfm-analyze-experts``: expert-choice analysis of a model (the analysis: eval/experts.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..eval import experts
from ..eval.experts import analyze, domain_texts

DOC = experts.__doc__ or ""  # the library module's usage text is the --help text


def main(argv=None) -> int:
    """Check the corpus before loading the model, then write the plots and summary.json."""
    ap = argparse.ArgumentParser(prog="scidfm-analyze-experts", description=DOC.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DOC)
    ap.add_argument("--model", required=True, help="Hugging Face folder or megatron checkpoint")
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "examples" / "sample_corpus"),
                    help="a folder of *.jsonl / *.txt files, one domain per file (the file name), or one jsonl "
                         "file whose records carry --domain-key (default: the sample corpus)")
    ap.add_argument("--text-key", default="text", help="jsonl: the key holding each text (default text)")
    ap.add_argument("--domain-key", default="domain",
                    help="jsonl: records with this key are grouped by its value within their file (default domain)")
    ap.add_argument("--per-domain", type=int, default=30, help="texts per domain (the first N)")
    ap.add_argument("--max-tokens", type=int, default=256, help="first N tokens of each text")
    ap.add_argument("--out", required=True, help="output directory (PNGs, summary.json, expert_choice.npz)")
    ap.add_argument("--tokenizer", default=None, help="megatron checkpoints: tokenizer (default: the one it keeps)")
    args = ap.parse_args(argv)
    from ..errors import ScidfmError
    from ..eval.models import load_model

    try:  # the corpus is checked before the model is loaded; a bad corpus, --model or --tokenizer: one line
        groups = domain_texts(args.corpus, args.per_domain, text_key=args.text_key, domain_key=args.domain_key)
        print("[scidfm] domains: " + ", ".join(f"{k} ({len(v)})" for k, v in groups.items()), file=sys.stderr)
        model = load_model(args.model, tokenizer=args.tokenizer)
    except (ScidfmError, OSError) as exc:  # CorpusError is a ScidfmError
        print(f"scidfm-analyze-experts: error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = analyze(model, groups, args.out, max_tokens=args.max_tokens)
    finally:
        model.close()
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=1))
    print(f"[scidfm] plots -> {Path(args.out) / 'expert_choice_tsne.png'}, "
          f"{Path(args.out) / 'expert_usage_heatmaps.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
