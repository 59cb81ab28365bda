"""Report a corpus mixture: tokens per category, domain and source, per epoch; or its megatron blend.

    scidfm-mixture examples/mixtures/scidfm_table2.yaml --epoch 2
    scidfm-mixture examples/mixtures/sample_corpus.yaml --blend      # Megatron-LM --data-path form
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scidfm-mixture", description=__doc__.splitlines()[0])
    ap.add_argument("recipe", help="mixture YAML (examples/mixtures/)")
    ap.add_argument("--epoch", type=int, default=1, help="which epoch of the mixture (its re-sampled sources)")
    ap.add_argument("--data-root", default=None, help="override the recipe's data_root")
    ap.add_argument("--blend", action="store_true", help="print 'w1 prefix1 w2 prefix2 ...' (Megatron-LM --data-path)")
    args = ap.parse_args(argv)
    from ..config import ConfigError
    from ..data.mixture import Mixture

    try:
        mix = Mixture.load(args.recipe, data_root=args.data_root)
        if args.blend:
            prefixes, weights = mix.blend(args.epoch)
            print(" ".join(f"{w:.6g} {p}" for p, w in zip(prefixes, weights, strict=False)))
        else:
            print(mix.report(args.epoch))
    except ConfigError as exc:
        print(f"scidfm-mixture: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
