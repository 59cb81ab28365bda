"""Build the SciDFM science tokenizer from a base SentencePiece model.

    scidfm-build-tokenizer --base-model BASE.model --output-dir DIR \\
        [--bracket-atoms-from FILE[:KEY] ...] [--min-count N] [--probe-from FILE[:KEY] ...] [--allow-lossy-base]

Writes DIR/tokenizer.model, DIR/science_tokens.json and the Hugging Face files; a base model that loses
text is refused (docs/data.md, "Science tokenizer").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _smiles_from(spec: str, rejects: list, strict: bool):
    """SMILES strings of one --bracket-atoms-from source. A bad line (invalid UTF-8, bad JSON, missing key,
    a lone surrogate) is appended to ``rejects`` as "file:line: reason" and skipped; ``strict`` stops at
    the first one."""
    from ..tokenizer.core import MOL_END, MOL_START
    from ..utils import decode_line, lone_surrogate

    path, _, key = spec.partition(":")
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"--bracket-atoms-from {spec}: no such file")
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            value: Any = None  # the line's text or its JSON value at key; a str once bad is None
            line, bad = decode_line(raw)
            if line is not None:
                if not line.strip():
                    continue
                if not key:
                    value = line.split()[0]
                else:
                    try:
                        value = json.loads(line)[key]
                        if not isinstance(value, str):
                            bad = f"key {key!r} is not a string"
                    except json.JSONDecodeError as exc:
                        bad = f"invalid JSON: {exc.msg} at column {exc.colno}"
                    except (KeyError, TypeError):
                        bad = f"no key {key!r} in this line's JSON object"
                surrogate = None if bad else lone_surrogate(value, f"key {key!r}" if key else "text")
                if surrogate:
                    bad = surrogate + " (not valid Unicode: an emoji or character cut in half?)"
            if bad:
                msg = f"{p}:{lineno}: {bad}"
                if strict:
                    raise SystemExit(f"scidfm-build-tokenizer: {msg} (--strict: nothing written)")
                rejects.append(msg)
                continue
            if MOL_START in value:
                for chunk in value.split(MOL_START)[1:]:
                    yield chunk.split(MOL_END, 1)[0]
            else:
                yield value


def _texts_from(spec: str, skipped: list) -> list[str]:
    """Texts of one --probe-from source: KEY of each jsonl line, or each line of a text file."""
    from ..utils import decode_line, lone_surrogate

    path, _, key = spec.partition(":")
    if not Path(path).exists():
        raise SystemExit(f"--probe-from {spec}: no such file")
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line, bad = decode_line(raw.rstrip(b"\n"))
            if line is not None and not bad and key:
                try:
                    line = json.loads(line)[key]
                except (ValueError, KeyError, TypeError):
                    line = None
            if not isinstance(line, str) or bad or lone_surrogate(line):
                skipped.append(f"{path}:{lineno}")
            elif line.strip():
                out.append(line)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scidfm-build-tokenizer", description=__doc__.splitlines()[0])
    ap.add_argument("--base-model", required=True, help="Llama-style SentencePiece BPE tokenizer.model")
    ap.add_argument("--output-dir", required=True,
                    help="folder for tokenizer.model, science_tokens.json and the Hugging Face files")
    ap.add_argument("--bracket-atoms-from", nargs="*", default=[], metavar="FILE[:KEY]",
                    help="make the bracket atoms ([C@@H], [Fe+2]...) of these files single tokens: .smi/.txt (first "
                         "column), or jsonl with KEY (a SMILES field, or a text field's molecule spans)")
    ap.add_argument("--min-count", type=int, default=1,
                    help="keep a bracket atom seen at least this often in --bracket-atoms-from (default 1)")
    ap.add_argument("--strict", action="store_true",
                    help="stop at the first unreadable --bracket-atoms-from line (default: skip and list it)")
    ap.add_argument("--probe-from", nargs="*", default=[], metavar="FILE[:KEY]",
                    help="also check the round trip on these texts (jsonl with KEY, or one text per line)")
    ap.add_argument("--allow-lossy-base", action="store_true",
                    help="build even when probe texts do not decode to themselves (the base normaliser loses text)")
    args = ap.parse_args(argv)
    from ..tokenizer.build import ROUND_TRIP_PROBES, build_tokenizer, harvest_bracket_atoms

    extra: list[str] = []
    rejects: list[str] = []
    if args.bracket_atoms_from:
        smiles = (s for spec in args.bracket_atoms_from for s in _smiles_from(spec, rejects, args.strict))
        extra = harvest_bracket_atoms(smiles, args.min_count)
        if rejects:
            print(f"skipped {len(rejects)} unreadable line(s) of --bracket-atoms-from:", file=sys.stderr)
            for r in rejects[:20]:
                print(f"  {r}", file=sys.stderr)
            if len(rejects) > 20:
                print(f"  ... {len(rejects) - 20} more", file=sys.stderr)
    probes = list(ROUND_TRIP_PROBES)
    skipped: list[str] = []
    for spec in args.probe_from:
        probes += _texts_from(spec, skipped)
    if skipped:
        print(f"--probe-from: skipped {len(skipped)} unreadable line(s), e.g. {skipped[0]}", file=sys.stderr)
    notes: list[str] = []
    try:
        tok = build_tokenizer(args.base_model, args.output_dir, extra, probes=probes,
                              allow_lossy=args.allow_lossy_base, notes=notes)
    except (ValueError, OSError) as exc:
        print(f"scidfm-build-tokenizer: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"scidfm-build-tokenizer: {note}", file=sys.stderr if "--allow-lossy-base" in note or
              "unigram" in note else sys.stdout)
    print(f"wrote {args.output_dir}/tokenizer.model: {tok.vocab_size} pieces "
          f"({len(tok.mol_vocab)} molecule tokens incl. {len(extra)} harvested bracket atoms, "
          f"{len(tok.prot_vocab)} protein tokens, span markers and specials at ids "
          f"{min(tok.special_ids.values())}..{max(tok.special_ids.values())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
