"""``scidfm-prepare-data``: a run's dataset indices built on CPU before the GPU job (data/prepare.py)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..config import ConfigError
from ..data import prepare
from ..data.prepare import build_run_datasets, check_pretrain, default_threads, run_cache_dir

DOC = prepare.__doc__ or ""  # the library module's usage text is the --help text


def main(argv=None) -> int:
    """Read the recipe as ``scidfm-train`` does and build its dataset indices into the cache."""
    ap = argparse.ArgumentParser(prog="scidfm-prepare-data", description=DOC.splitlines()[0])
    ap.add_argument("--config", required=True, help="the pretraining recipe the run will use")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, as given to scidfm-train")
    ap.add_argument("--epochs", default=None,
                    help="mixture epochs to prepare, e.g. 1,2 (default: the recipe's data.epoch)")
    ap.add_argument("--threads", type=int, default=None,
                    help=f"sources indexed in parallel (default: cores, at most 8; here {default_threads()})")
    args = ap.parse_args(argv)
    import logging

    from ..training.config import load_run_config
    from .train import quiet_megatron

    quiet_megatron()
    logging.basicConfig(level=logging.INFO, format="[scidfm] %(message)s")
    try:
        cfg = load_run_config(args.config, args.overrides)
        check_pretrain(cfg)
        cache_dir = run_cache_dir(cfg)
        if cache_dir is None:
            raise ConfigError("data.cache_dir is not set (nor checkpoint.save): give the directory the run will "
                              "read its dataset indices from, e.g. data.cache_dir=/data/scidfm/cache")
        try:
            epochs = [int(e) for e in args.epochs.split(",")] if args.epochs else [cfg.data.epoch]
        except ValueError:
            raise ConfigError(f"--epochs {args.epochs!r}: give epoch numbers separated by commas, e.g. 1,2") from None
        from ..tokenizer.plain import load_tokenizer

        tokenizer = load_tokenizer(cfg.data.tokenizer_model)  # science or plain, as the trainer loads it
        os.makedirs(cache_dir, exist_ok=True)
        for epoch in epochs:
            t0 = time.perf_counter()
            train, valid, _ = build_run_datasets(cfg, tokenizer, epoch=epoch, threads=args.threads, cache_dir=cache_dir)
            print(f"[scidfm] epoch {epoch}: train {len(train)} samples"
                  + (f", validation {len(valid)}" if valid is not None else "")
                  + f" of {cfg.train.seq_length} tokens; indices in {cache_dir} ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
    except ConfigError as exc:
        print(f"scidfm-prepare-data: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"scidfm-prepare-data: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
