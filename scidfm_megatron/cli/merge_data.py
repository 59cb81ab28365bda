"""``scidfm-merge-data``: merge the shards of ``scidfm-preprocess --shard K/N`` (the plan: data/shards.py)."""

from __future__ import annotations

import sys

from ..data.shards import ShardError, merge


def main(argv=None) -> int:
    """scidfm-merge-data: check N shards' manifests and merge them in order."""
    import argparse

    ap = argparse.ArgumentParser(prog="scidfm-merge-data", description=main.__doc__)
    ap.add_argument("--input-prefix", required=True, help="the --output-prefix the shards were made with")
    ap.add_argument("--shards", type=int, required=True, help="N of --shard K/N")
    ap.add_argument("--output-prefix", required=True, help="merged datasets: <prefix>_<key>_document.{bin,idx}")
    ap.add_argument("--no-verify-checksums", action="store_true", help="check sizes only (faster)")
    args = ap.parse_args(argv)
    if args.shards < 1:
        ap.error("--shards must be >= 1")
    try:
        totals = merge(args.input_prefix, args.shards, args.output_prefix, not args.no_verify_checksums)
    except ShardError as exc:
        print(f"scidfm-merge-data: error: {exc}", file=sys.stderr)
        return 2
    for key, out in totals["outputs"].items():
        print(f"{key}: {totals['documents'][key]:,} documents, {totals['tokens'][key]:,} tokens from "
              f"{args.shards} shards -> {out}.{{bin,idx}}")
    print(f"{totals['lines']:,} lines, {totals['bytes'] / 1e6:.1f} MB; rejected lines: {totals['rejected']:,}"
          + (f" (in {', '.join(totals['rejected_files'])})" if totals["rejected_files"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
