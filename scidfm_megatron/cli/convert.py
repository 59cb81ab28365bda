"""Convert checkpoints between megatron-core (any TP/PP/EP/DP) and Hugging Face (Mixtral layout).

    scidfm-convert --direction mcore-to-hf --load runs/tiny/sft --save hf/tiny-sft [--dtype bf16|fp32]
    scidfm-convert --direction hf-to-mcore --load hf/tiny-sft --save ckpt/tiny --tp 2 --pp 2 --ep 2
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scidfm-convert", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--direction", required=True, choices=["mcore-to-hf", "hf-to-mcore"])
    ap.add_argument("--load", required=True, help="source: megatron checkpoint (run dir, checkpoints/ or "
                    "iter_XXXXXXX) or Hugging Face folder")
    ap.add_argument("--save", required=True, help="destination directory (written only when complete)")
    ap.add_argument("--tp", type=int, default=1, help="hf-to-mcore: tensor parallel degree of the output")
    ap.add_argument("--pp", type=int, default=1, help="hf-to-mcore: pipeline parallel degree")
    ap.add_argument("--ep", type=int, default=1, help="hf-to-mcore: expert parallel degree")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help="output dtype (mcore-to-hf default bf16, as the release; hf-to-mcore default: the source's)")
    ap.add_argument("--tokenizer", default=None, help="mcore-to-hf: tokenizer dir or tokenizer.model "
                    "(default: the one the run trained with)")
    ap.add_argument("--max-shard-size", default="5GB", help="mcore-to-hf: largest safetensors file (e.g. 2GB)")
    ap.add_argument("--force", action="store_true", help="replace an existing --save directory")
    args = ap.parse_args(argv)
    from ..config import ConfigError
    from ..parallel import ParallelConfigError
    from ..testing.distributed import TorchrunError
    from .._errors import conversion_errors

    try:
        if args.direction == "mcore-to-hf":
            if (args.tp, args.pp, args.ep) != (1, 1, 1):
                ap.error("--tp/--pp/--ep describe the output of hf-to-mcore; a megatron checkpoint's layout is "
                         "read from the checkpoint itself")
            from ..convert.mcore_to_hf import convert_mcore_to_hf

            out = convert_mcore_to_hf(args.load, args.save, dtype=args.dtype or "bf16", tokenizer=args.tokenizer,
                                      max_shard_size=args.max_shard_size, force=args.force)
        else:
            from ..convert.hf_to_mcore import convert_hf_to_mcore

            out = convert_hf_to_mcore(args.load, args.save, tp=args.tp, pp=args.pp, ep=args.ep, dtype=args.dtype,
                                      force=args.force)
    except (conversion_errors() + (ConfigError, ParallelConfigError, FileExistsError)) as exc:
        print(f"scidfm-convert: error: {exc}", file=sys.stderr)
        return 2
    except TorchrunError as exc:
        print(f"scidfm-convert: error: conversion processes failed: {exc}", file=sys.stderr)
        return 1
    print(f"[scidfm] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
