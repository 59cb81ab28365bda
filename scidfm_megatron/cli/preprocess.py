"""Tokenize jsonl corpora into Megatron .bin/.idx datasets (Megatron-LM's flag names where it has them).

    scidfm-preprocess --input data/*.jsonl.zst --output-prefix out/papers --json-keys text \\
        --tokenizer-model tok/tokenizer.model --workers 8 --append-eod

writes out/papers_text_document.{bin,idx} (readable by megatron-core's IndexedDataset), plus
out/papers_summary.json and out/papers_rejected.jsonl (every bad line: file, line, reason).
Database sources: ``--json-keys smiles --span smiles=molecule`` wraps each value in the molecule span
markers (``protein`` for sequences). ``--strict`` stops at the first bad line and writes nothing.
Exit status: 0 complete, 1 input error (strict) or interrupted, 2 bad arguments (including --span or
SFT data with a plain SentencePiece model, which has no span or chat vocabulary).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scidfm-preprocess", description=__doc__.splitlines()[0])
    g = ap.add_argument_group("Megatron-LM compatible")
    g.add_argument("--input", required=True, nargs="+",
                   help="jsonl / .jsonl.gz / .jsonl.zst / .parquet files, dirs or globs")
    g.add_argument("--output-prefix", required=True,
                   help="output path prefix: <prefix>_<key>_document.bin/.idx (SFT: <prefix>_tokens/_lossmask)")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="(SFT: the messages key, default messages)")
    g.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    g.add_argument("--append-eod", action="store_true", help="end every document with <|eod|>")
    g.add_argument("--tokenizer-model", required=True, help="extended tokenizer.model (scidfm-build-tokenizer)")
    g.add_argument("--tokenizer-type", default="SciDFMTokenizer",
                   help="accepted for Megatron-LM compatibility; only the science tokenizer is supported")
    g.add_argument("--log-interval", type=int, default=None, help="accepted for compatibility (progress bar instead)")
    s = ap.add_argument_group("scidfm")
    s.add_argument("--span", action="append", default=[], metavar="KEY=molecule|protein",
                   help="wrap that key's values in molecule / protein span markers")
    s.add_argument("--strict", action="store_true", help="stop at the first bad line; write nothing")
    s.add_argument("--sft-seq-length", type=int, default=None, metavar="S",
                   help="instruction data: records are conversations (--sft-format); write packed SFT sequences of S+1 "
                        "tokens with assistant-only loss masks (<prefix>_tokens / <prefix>_lossmask)")
    s.add_argument("--sft-format", default="auto",
                   choices=("auto", "messages", "sharegpt", "alpaca", "query_response"),
                   help="SFT record format: messages [{role, content}], sharegpt (conversations [{from, value}]), "
                        "alpaca (instruction/input/output), query_response (MetaMathQA); auto (default) chooses "
                        "per file from its first record and prints the choice")
    s.add_argument("--no-pack", action="store_true", help="SFT: one conversation per sequence")
    s.add_argument("--shard", default=None, metavar="K/N",
                   help="only share K (0..N-1) of N of the inputs, into <prefix>.shard-K-of-N_* with a manifest "
                        "(skipped when already complete); merge with scidfm-merge-data")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (logs, batch jobs)")
    args = ap.parse_args(argv)
    if args.tokenizer_type not in ("SciDFMTokenizer", "SentencePieceTokenizer"):
        ap.error(f"--tokenizer-type {args.tokenizer_type}: only the SciDFM science tokenizer is supported")
    spans = {}
    for item in args.span:
        key, sep, kind = item.partition("=")
        if not sep:
            ap.error(f"--span {item!r}: expected KEY=molecule or KEY=protein")
        spans[key] = kind
    from ..data.preprocess import PreprocessError, preprocess
    from ..data.shards import ShardError, parse_shard

    try:
        shard = parse_shard(args.shard) if args.shard else None
    except ShardError as exc:
        ap.error(str(exc))
    try:
        summary = preprocess(args.input, args.output_prefix, args.tokenizer_model, json_keys=args.json_keys,
                             spans=spans, append_eod=args.append_eod, workers=args.workers, strict=args.strict,
                             progress=not args.no_progress, sft_seq_length=args.sft_seq_length,
                             sft_pack=not args.no_pack, sft_format=args.sft_format, shard=shard)
    except PreprocessError as exc:
        print(f"scidfm-preprocess: error: {exc}", file=sys.stderr)
        return 2 if type(exc).__name__ == "PreprocessUsageError" else 1
    except KeyboardInterrupt:
        print("scidfm-preprocess: interrupted; nothing written at the output names", file=sys.stderr)
        return 1
    except Exception as exc:  # the _Terminate from SIGTERM and anything unexpected: outputs already removed
        if type(exc).__name__ == "_Terminate":
            print("scidfm-preprocess: terminated; nothing written at the output names", file=sys.stderr)
            return 1
        raise
    print(summary.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
