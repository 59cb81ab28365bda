"""The one training entry: ``main()`` of ``scidfm-train``; the stage comes from the recipe (``train.stage``).

    torchrun --nproc-per-node 8 -m scidfm_megatron.train --config RECIPE [a.b=value ...]
    scidfm-train --config RECIPE --check --world-size 128   # validate, print the layout
    scidfm-train --config RECIPE --print-config             # the resolved recipe

``-m scidfm_megatron.train`` (the launch path of job scripts), ``-m scidfm_megatron.pretrain`` / ``.sft`` and
the console scripts ``scidfm-pretrain`` / ``scidfm-sft`` all run this ``main``; the last four add
``--stage pretrain|sft``, which refuses a recipe of the other stage.

The whole configuration is validated before any model, process group or dataset is built (docs/training.md).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

# megatron-core warns at import, once per module and rank, that TransformerEngine / apex are missing (four
# to six lines per process). The run logs the implementations it actually uses in one line instead
# ("[scidfm] ... attention DotProductAttention; experts SequentialMLP; ..."), so these go.
QUIET_WARNINGS = (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                  r"full scope is deprecated", r"`torch.distributed.all_gather_into_tensor` is deprecated")


def quiet_megatron() -> None:
    """Drop megatron-core's import warnings and INFO lines: the run logs what it uses in one line instead."""
    import logging
    import warnings

    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # megatron's INFO lines (its DDP config, every bucket's parameter list) drown the training log
    logging.getLogger("megatron").setLevel(logging.WARNING)


def main(argv: Optional[list[str]] = None) -> int:
    """``scidfm-train``: validate the recipe, then check, print or run it; 2 and one line on a config error."""
    quiet_megatron()
    ap = argparse.ArgumentParser(
        prog="scidfm-train", description="SciDFM training on megatron-core: stage 1/2 pretraining or SFT, as the "
                                         "recipe says (launch with torchrun; overrides as a.b=value)")
    ap.add_argument("--config", required=True, help="recipe YAML (examples/recipes/)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-5 parallel.tp=2")
    ap.add_argument("--print-config", action="store_true", help="validate, print the resolved config and exit")
    ap.add_argument("--check", action="store_true",
                    help="validate the whole config for --world-size processes, print the layout and exit")
    ap.add_argument("--layout-only", action="store_true",
                    help="with --check: check the layout, model and megatron-core's config only, opening no "
                         "file (data, tokenizer, checkpoints): for a cluster recipe on a machine without its paths")
    ap.add_argument("--world-size", type=int, default=None,
                    help="with --check: the number of processes to validate for (default: $WORLD_SIZE or 1)")
    ap.add_argument("--stage", choices=("pretrain", "sft"), default=None,
                    help="refuse a recipe whose train.stage is not this one (scidfm-pretrain / scidfm-sft, "
                         "-m scidfm_megatron.pretrain / .sft); the recipe still chooses the stage")
    args = ap.parse_args(argv)
    stage = args.stage
    prog = f"scidfm-{stage}" if stage else "scidfm-train"
    from ..config import ConfigError
    from ..parallel import ParallelConfigError
    from ..training.config import load_run_config, validate_run
    from ..training.faults import RunStopped

    try:
        cfg = load_run_config(args.config, args.overrides)
        if stage is not None and (stage == "sft") != (cfg.train.stage == "sft"):
            raise ConfigError(f"{args.config} is a train.stage={cfg.train.stage} recipe; use scidfm-"
                              f"{'sft' if cfg.train.stage == 'sft' else 'pretrain'} (or scidfm-train)")
        from ..parallel import env_world_size

        world = args.world_size or env_world_size()
        if args.layout_only and not args.check:
            raise ConfigError("--layout-only goes with --check (a run needs its files)")
        layout = validate_run(cfg, world, layout_only=args.layout_only)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        if args.check:
            from ..training.megatron_check import applied_defaults

            for note in applied_defaults(cfg.model):
                print(f"[scidfm] {note}", flush=True)
            print(f"[scidfm] {args.config}: {cfg.train.stage} of {cfg.model.name} on {layout} "
                  f"(backend {cfg.model.backend}, precision {cfg.train.precision}): "
                  f"{'layout and model (no file opened)' if args.layout_only else 'configuration'} OK", flush=True)
            if not args.layout_only:
                from ..training.schedule import check_report

                report = check_report(cfg)  # a resume applies the recipe's LR schedule: show what changes
                if report:
                    print(report, flush=True)
            return 0
        from ..training.trainer import run

        run(cfg, validated=True)
        # The run is over and its files closed (Trainer.close). The interpreter's last full collection at exit
        # would walk every object torch and megatron made (~0.8 s of CPU per rank, measured with py-spy on
        # scidfm-tiny); frozen objects are skipped, and the process's memory goes back to the OS anyway.
        import gc

        gc.freeze()
    except (ConfigError, ParallelConfigError) as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    except RunStopped as exc:  # a fault policy (training/faults.py): one line, from one rank
        import os

        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: stopped: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def pretrain() -> int:
    """``scidfm-pretrain``: ``scidfm-train --stage pretrain`` (kept for existing job scripts)."""
    return main(["--stage", "pretrain", *sys.argv[1:]])


def sft() -> int:
    """``scidfm-sft``: ``scidfm-train --stage sft`` (kept for existing job scripts)."""
    return main(["--stage", "sft", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
