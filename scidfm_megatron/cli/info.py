"""scidfm-info PRESET: parameter counts, training FLOPs per token and layer shapes of a model preset.

    scidfm-info scidfm-18b
    scidfm-info scidfm-tiny --seq-len 256 --set num_layers=8
"""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError, from_dict, parse_override, to_dict
from ..model.accounting import count_parameters, matmul_params_per_token, tensor_shapes, training_flops_per_token
from ..model.presets import PRESETS, get_preset
from ..config import ModelConfig


def _b(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.3f}B"
    if n >= 1e6:
        return f"{n / 1e6:.3f}M"
    return f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def render(cfg: ModelConfig, seq_len: int | None = None) -> str:
    seq = seq_len or cfg.max_seq_length
    built = count_parameters(cfg, padded_vocab=True)
    rel = count_parameters(cfg, padded_vocab=False)
    lines = [f"{cfg.name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads "
             f"x {cfg.head_dim} (kv heads {cfg.num_query_groups}), {cfg.num_experts} experts top-{cfg.moe_router_topk} "
             f"(ffn {cfg.moe_ffn_hidden_size}), vocab {cfg.vocab_size} (padded {cfg.padded_vocab_size}), "
             f"context {cfg.max_seq_length}",
             "",
             f"{'parameters':<28}{'vocab ' + str(cfg.vocab_size):>18}{'padded ' + str(cfg.padded_vocab_size):>18}"]
    for label, key in (("total", "total"), ("active per token", "active"),
                       ("embedding + output layer", "embedding"), ("non-embedding", "non_embedding"),
                       ("active non-embedding", "active_non_embedding"), ("per layer", "per_layer"),
                       ("per expert", "per_expert")):
        a, b = getattr(rel, key), getattr(built, key)
        lines.append(f"  {label:<26}{_b(a):>18}{_b(b):>18}   ({a:,})")
    flops = training_flops_per_token(cfg, seq)
    lines += ["",
              f"training FLOPs per token at seq {seq}: {flops / 1e9:.2f} GFLOP "
              f"(6 x {_b(matmul_params_per_token(cfg))} active matmul weights + attention {12 * cfg.num_layers * seq * cfg.attention_width / 1e9:.2f} GFLOP)",
              "", "layer shapes (layer 0; every layer is the same):"]
    for t in tensor_shapes(cfg):
        if t.name.startswith("decoder.layers.0.") and ".local_experts." in t.name and ".local_experts.0." not in t.name:
            continue
        if t.name.startswith("decoder.layers.") and not t.name.startswith("decoder.layers.0."):
            continue
        name = t.name.replace(".local_experts.0.", f".local_experts.[0..{cfg.num_experts - 1}].")
        lines.append(f"  {name:<72}{str(tuple(t.shape)):>16}{_b(t.numel):>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scidfm-info", description=__doc__.splitlines()[0])
    ap.add_argument("preset", help=f"one of {sorted(PRESETS)}")
    ap.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: context)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a model field, e.g. --set num_layers=2")
    args = ap.parse_args(argv)
    try:
        cfg = get_preset(args.preset)
        if args.set:
            data = to_dict(cfg)
            for text in args.set:
                keys, value = parse_override(text)
                if len(keys) != 1:
                    raise ConfigError(f"--set {text!r}: model fields are not nested")
                data[keys[0]] = value
            cfg = from_dict(ModelConfig, data, "model")
            cfg.validate()
    except ConfigError as exc:
        print(f"scidfm-info: {exc}", file=sys.stderr)
        return 2
    print(render(cfg, args.seq_len))
    return 0


if __name__ == "__main__":
    sys.exit(main())
