"""``scidfm-eval-data``: public benchmark files -> task files (the converters: eval/converters.py)."""

from __future__ import annotations

import argparse
import sys

from ..eval import converters
from ..eval.converters import CONVERTERS, ConvertError, Report, convert

DOC = converters.__doc__ or ""  # the library module's usage text is the --help text


def main(argv=None) -> int:
    """Convert one benchmark file; exit 2 with one line naming the file and field on bad input."""
    ap = argparse.ArgumentParser(prog="scidfm-eval-data", description=DOC.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DOC)
    ap.add_argument("benchmark", choices=sorted(CONVERTERS), help="which benchmark's public file SRC is")
    ap.add_argument("src", help="the benchmark's public file, .gz accepted (MATH: its folder; MMLU: a CSV or a "
                                "folder of *_test.csv)")
    ap.add_argument("-o", "--output", required=True, help="task file to write (<task>.jsonl)")
    ap.add_argument("--test-ids", default=None, metavar="JSON",
                    help="pubmedqa: the release's test_ground_truth.json; keep only its 500 test questions")
    a = ap.parse_args(argv)
    rep = Report()
    try:
        convert(a.benchmark, a.src, a.output, test_ids=a.test_ids, report=rep)
    except (ConvertError, OSError) as exc:
        print(f"scidfm-eval-data: error: {exc}", file=sys.stderr)
        return 2
    print(rep.render(a.benchmark, a.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
