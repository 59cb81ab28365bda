"""Build the SciDFM science tokenizer from a base SentencePiece model.

    scidfm-build-tokenizer --base-model BASE.model --output-dir DIR \\
        [--bracket-atoms-from FILE[:KEY] ...] [--min-count N]

Writes DIR/tokenizer.model (base pieces + span markers + molecule + protein tokens + specials),
DIR/science_tokens.json (the inventory with ids) and Hugging Face files (tokenizer_config.json,
special_tokens_map.json, tokenization_scidfm.py; load with AutoTokenizer(..., trust_remote_code=True)).
``--bracket-atoms-from`` adds every bracket atom (``[C@@H]``, ``[Fe+2]``...) seen at least --min-count
times, so they become single tokens: .smi/.txt files (first column), or jsonl with KEY (a SMILES field,
or a text field whose molecule spans are scanned).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _smiles_from(spec: str):
    from ..tokenizer.core import MOL_END, MOL_START

    path, _, key = spec.partition(":")
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"--bracket-atoms-from {spec}: no such file")
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not key:
                yield line.split()[0]
                continue
            try:
                value = json.loads(line)[key]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SystemExit(f"{p}:{lineno}: cannot read key {key!r} ({exc})") from None
            if MOL_START in value:
                for chunk in value.split(MOL_START)[1:]:
                    yield chunk.split(MOL_END, 1)[0]
            else:
                yield value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scidfm-build-tokenizer", description=__doc__.splitlines()[0])
    ap.add_argument("--base-model", required=True, help="Llama-style SentencePiece BPE tokenizer.model")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--bracket-atoms-from", nargs="*", default=[], metavar="FILE[:KEY]")
    ap.add_argument("--min-count", type=int, default=1)
    args = ap.parse_args(argv)
    from ..tokenizer.build import build_tokenizer, harvest_bracket_atoms

    extra = []
    if args.bracket_atoms_from:
        smiles = (s for spec in args.bracket_atoms_from for s in _smiles_from(spec))
        extra = harvest_bracket_atoms(smiles, args.min_count)
    try:
        tok = build_tokenizer(args.base_model, args.output_dir, extra)
    except (ValueError, OSError) as exc:
        print(f"scidfm-build-tokenizer: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_dir}/tokenizer.model: {tok.vocab_size} pieces "
          f"({len(tok.mol_vocab)} molecule tokens incl. {len(extra)} harvested bracket atoms, "
          f"{len(tok.prot_vocab)} protein tokens, span markers and specials at ids "
          f"{min(tok.special_ids.values())}..{max(tok.special_ids.values())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
