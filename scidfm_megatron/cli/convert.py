"""Convert checkpoints between megatron-core (any TP/PP/EP/DP) and Hugging Face (Mixtral layout).

    scidfm-convert --direction mcore-to-hf --load runs/tiny/sft --save hf/tiny-sft [--dtype bf16|fp32] [--verify]
    scidfm-convert --direction hf-to-mcore --load hf/tiny-sft --save ckpt/tiny --tp 2 --pp 2 --ep 2 [--verify]

Output dtype: the source's unless --dtype says otherwise (printed). Tokenizer: the science tokenizer, a
plain SentencePiece model or a Hugging Face tokenizer folder (copied as it is), or none (weights only).
--verify: after writing, run both sides on a fixed batch of real text and compare every layer's hidden
states, router top-k choices and the logits; exit 1 naming the first layer beyond the dtype's tolerance
(the output is then not kept). Bad input: one line, exit 2, nothing written.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scidfm-convert", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--direction", required=True, choices=["mcore-to-hf", "hf-to-mcore"],
                    help="mcore-to-hf: megatron checkpoint -> Hugging Face Mixtral folder; hf-to-mcore: the way back")
    ap.add_argument("--load", required=True, help="source: megatron checkpoint (run dir, checkpoints/ or "
                    "iter_XXXXXXX) or Hugging Face folder")
    ap.add_argument("--save", required=True, help="destination directory (written only when complete)")
    ap.add_argument("--tp", type=int, default=1, help="hf-to-mcore: tensor parallel degree the output is for")
    ap.add_argument("--pp", type=int, default=1, help="hf-to-mcore: pipeline parallel degree")
    ap.add_argument("--ep", type=int, default=1, help="hf-to-mcore: expert parallel degree")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help="output dtype (default: the source's, so nothing is lost)")
    ap.add_argument("--tokenizer", default=None, help="mcore-to-hf: tokenizer folder, tokenizer.model, or 'none' "
                    "for a weights-only export (default: the one the checkpoint records). hf-to-mcore takes the "
                    "tokenizer files of the --load folder")
    ap.add_argument("--max-shard-size", default="5GB", help="mcore-to-hf: largest safetensors file (e.g. 2GB)")
    ap.add_argument("--verify", action="store_true", help="check the output against the source on real text "
                    "(hidden states and router choices per layer, logits) before keeping it")
    ap.add_argument("--verify-tokens", type=int, default=64, help="--verify: tokens per sequence (default 64)")
    ap.add_argument("--verify-batch", type=int, default=2, help="--verify: sequences (default 2)")
    ap.add_argument("--force", action="store_true", help="replace an existing --save directory")
    args = ap.parse_args(argv)
    if args.direction == "mcore-to-hf" and (args.tp, args.pp, args.ep) != (1, 1, 1):
        ap.error("--tp/--pp/--ep describe the output of hf-to-mcore; a megatron checkpoint's layout is "
                 "read from the checkpoint itself")
    if args.direction == "hf-to-mcore" and args.tokenizer is not None:
        ap.error("--tokenizer is for mcore-to-hf; hf-to-mcore carries the tokenizer files of the --load folder")
    if args.verify_tokens < 1 or args.verify_batch < 1:
        ap.error("--verify-tokens and --verify-batch must be >= 1")
    from ..errors import ScidfmError, VerifyError

    verify_options = dict(tokens=args.verify_tokens, batch=args.verify_batch)
    try:
        if args.direction == "mcore-to-hf":
            from ..convert.mcore_to_hf import convert_mcore_to_hf

            out = convert_mcore_to_hf(args.load, args.save, dtype=args.dtype, tokenizer=args.tokenizer,
                                      max_shard_size=args.max_shard_size, force=args.force, verify=args.verify,
                                      verify_options=verify_options)
        else:
            from ..convert.hf_to_mcore import convert_hf_to_mcore

            out = convert_hf_to_mcore(args.load, args.save, tp=args.tp, pp=args.pp, ep=args.ep, dtype=args.dtype,
                                      force=args.force, verify=args.verify, verify_options=verify_options)
    except VerifyError as exc:
        print(f"scidfm-convert: {exc}; nothing written to {args.save}", file=sys.stderr)
        return 1
    except (ScidfmError, FileExistsError) as exc:  # bad input (checkpoint, tokenizer, config): one line
        print(f"scidfm-convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"[scidfm] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
