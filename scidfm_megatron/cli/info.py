"""scidfm-info PRESET: parameter counts, training FLOPs per token and layer shapes of a model preset; with
--layout, the per-GPU memory plan of that layout (weights, gradients, optimizer state, activations).

    scidfm-info scidfm-18b
    scidfm-info scidfm-tiny --seq-len 256 --set num_layers=8
    scidfm-info scidfm-18b --layout tp=2,pp=2,ep=8 --gpus 128 --gpu-memory 80
    scidfm-info --recipe examples/recipes/scidfm18b_stage1.yaml --gpus 128 --gpu-memory 80
"""

from __future__ import annotations

import argparse
import math
import sys

from ..config import ConfigError, ModelConfig, from_dict, parse_override, to_dict
from ..model.accounting import count_parameters, matmul_params_per_token, tensor_shapes, training_flops_per_token
from ..model.presets import PRESETS, get_preset


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
              f"(6 x {_b(matmul_params_per_token(cfg))} active matmul weights + attention "
              f"{12 * cfg.num_layers * seq * cfg.attention_width / 1e9:.2f} GFLOP)",
              "", "layer shapes (layer 0; every layer is the same):"]
    for t in tensor_shapes(cfg):
        if t.name.startswith("decoder.layers.0.") and ".local_experts." in t.name and ".local_experts.0." not in t.name:
            continue
        if t.name.startswith("decoder.layers.") and not t.name.startswith("decoder.layers.0."):
            continue
        name = t.name.replace(".local_experts.0.", f".local_experts.[0..{cfg.num_experts - 1}].")
        lines.append(f"  {name:<72}{str(tuple(t.shape)):>16}{_b(t.numel):>12}")
    return "\n".join(lines)


LAYOUT_KEYS = ("tp", "pp", "ep", "etp")


def parse_layout(text: str) -> dict:
    """'tp=2,pp=2,ep=8[,etp=1]' -> {'tp': 2, ...}; a wrong part is a ConfigError naming it."""
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in LAYOUT_KEYS or not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(f"--layout {text!r}: {part!r} is not one of {', '.join(k + '=N' for k in LAYOUT_KEYS)} "
                              f"with N >= 1")
        out[key] = int(value)
    return out


def plan_from_args(cfg: ModelConfig, args, recipe=None):
    """The memory plan the flags (and the recipe's parallel/train sections, when given) describe."""
    from ..config import ParallelConfig
    from ..model.accounting import GiB, memory_plan
    from ..parallel import validate_layout

    par = recipe.parallel if recipe is not None else ParallelConfig()
    if args.layout:
        par = ParallelConfig(**{**{k: getattr(par, k) for k in ("tp", "pp", "ep", "etp")},
                                **parse_layout(args.layout)})
    world = args.gpus or math.lcm(par.tp * par.pp, par.expert_tp * par.ep * par.pp)  # the smallest layout
    validate_layout(cfg, par, world)
    t = recipe.train if recipe is not None else None
    precision = args.precision or (t.precision if t is not None and t.precision != "auto" else "bf16")
    recompute = args.recompute if args.recompute is not None else (t.recompute if t is not None else "selective")
    dist = (not args.no_distributed_optimizer) if t is None else (t.use_distributed_optimizer
                                                                   and not args.no_distributed_optimizer)
    backend = args.backend or (cfg.backend if cfg.backend not in ("auto",) else "torch")
    return memory_plan(
        cfg, tp=par.tp, pp=par.pp, ep=par.ep, etp=par.etp, world_size=world,
        seq_len=args.seq_len or (t.seq_length if t is not None else None),
        micro_batch=args.micro_batch_size or (t.micro_batch_size if t is not None else 1),
        recompute=None if recompute in ("null", "none") else recompute, backend=backend, precision=precision,
        distributed_optimizer=dist,
        grad_reduce_in_fp32=recipe.engine.grad_reduce_in_fp32 if recipe is not None else True,
        gpu_memory=int(args.gpu_memory * GiB) if args.gpu_memory else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scidfm-info", description=__doc__.splitlines()[0])
    ap.add_argument("preset", nargs="?", help=f"one of {sorted(PRESETS)} (or --recipe)")
    ap.add_argument("--recipe", help="a training recipe (YAML): its model, layout, sequence, micro-batch, "
                                     "recompute and optimizer for the memory plan")
    ap.add_argument("--layout", help="tp=N,pp=N,ep=N[,etp=N]: print the per-GPU memory plan of this layout")
    ap.add_argument("--gpus", type=int, help="number of GPUs (world size) for the memory plan")
    ap.add_argument("--gpu-memory", type=float, help="GiB per GPU: say whether the layout fits")
    ap.add_argument("--micro-batch-size", type=int, help="memory plan: micro-batch (default 1 or the recipe's)")
    ap.add_argument("--recompute", help="memory plan: null, selective, full or a module list "
                                        "(default selective or the recipe's)")
    ap.add_argument("--backend", choices=["torch", "te", "te-sdpa", "local"], help="memory plan: layer implementations "
                                                                         "(default torch, the GPU fast path)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], help="memory plan: default bf16 or the recipe's")
    ap.add_argument("--no-distributed-optimizer", action="store_true",
                    help="memory plan: the plain optimizer (both are printed; this chooses the total)")
    ap.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: context)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a model field, e.g. --set num_layers=2")
    args = ap.parse_args(argv)
    recipe = None
    try:
        if args.recipe:
            from ..training.config import load_run_config

            recipe = load_run_config(args.recipe)
            if args.preset and args.preset != recipe.model.name:
                raise ConfigError(f"{args.recipe} is for {recipe.model.name}, not {args.preset}: drop the preset")
            args.preset = recipe.model.name
        if not args.preset:
            raise ConfigError("give a preset or --recipe")
        cfg = recipe.model if recipe is not None else get_preset(args.preset)
        if args.set:
            data = to_dict(cfg)
            for text in args.set:
                keys, value = parse_override(text)
                if len(keys) != 1:
                    raise ConfigError(f"--set {text!r}: model fields are not nested")
                data[keys[0]] = value
            cfg = from_dict(ModelConfig, data, "model")
            cfg.validate()
        plan = None
        if args.layout or args.recipe or args.gpus or args.gpu_memory:
            plan = plan_from_args(cfg, args, recipe)
    except (ConfigError, ValueError) as exc:
        print(f"scidfm-info: {exc}", file=sys.stderr)
        return 2
    print(render(cfg, args.seq_len))
    if plan is not None:
        from ..model.accounting import render_memory_plan

        print("\n" + render_memory_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
