"""``python -m scidfm_megatron.cli.sft_formats SRC.json DST.jsonl``: a JSON array file (Alpaca's release, say) as
JSON Lines for ``scidfm-preprocess`` (the formats: data/sft_formats.py)."""

from __future__ import annotations

from ..data.sft_formats import SFTFormatError, json_array_to_jsonl


def main(argv=None) -> int:
    """python -m scidfm_megatron.cli.sft_formats SRC.json DST.jsonl: a JSON array file as JSON Lines."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0].startswith("-"):
        print("usage: python -m scidfm_megatron.cli.sft_formats SRC.json DST.jsonl  (a JSON array file -> JSON "
              "Lines, for scidfm-preprocess)", file=sys.stderr)
        return 2
    try:
        n = json_array_to_jsonl(args[0], args[1])
    except (SFTFormatError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[scidfm] {args[0]}: {n:,} records -> {args[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
