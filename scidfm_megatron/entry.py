"""Shared command line of the stage entrypoints: ``--config RECIPE [a.b=value ...]``."""

from __future__ import annotations

import argparse
import sys


def main(stage: str, argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog=f"scidfm-{stage}",
        description=f"SciDFM {stage} on megatron-core (launch with torchrun; overrides as a.b=value)")
    ap.add_argument("--config", required=True, help="recipe YAML (examples/recipes/)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-5 parallel.tp=2")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = ap.parse_args(argv)
    from .config import ConfigError
    from .parallel import ParallelConfigError
    from .training.config import load_run_config

    try:
        cfg = load_run_config(args.config, args.overrides)
        if (stage == "sft") != (cfg.train.stage == "sft"):
            raise ConfigError(f"{args.config} is a train.stage={cfg.train.stage} recipe; use scidfm-"
                              f"{'sft' if cfg.train.stage == 'sft' else 'pretrain'}")
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        from .training.trainer import run

        run(cfg)
    except (ConfigError, ParallelConfigError) as exc:
        print(f"scidfm-{stage}: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0
