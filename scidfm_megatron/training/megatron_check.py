"""megatron-core's own config checks, run by ``validate_run`` (``--check``) before any process group exists.

megatron validates the model and MoE settings in ``TransformerConfig.__post_init__`` (e.g. "Please use
--moe-router-pre-softmax when topk is 1."), the DDP and optimizer settings in their config classes. The
trainer builds exactly these three objects before the first step; building them here, from the same
arguments (``engine.build_engine``), catches every setting megatron rejects in a second, and the error
names the recipe key that megatron's field or flag stands for.
"""

from __future__ import annotations

import re

from ..config import ConfigError

# megatron's TransformerConfig / DDP / optimizer field -> the recipe key that sets it.
RECIPE_KEYS = {
    "num_layers": "model.num_layers", "hidden_size": "model.hidden_size",
    "num_attention_heads": "model.num_attention_heads", "num_query_groups": "model.num_query_groups",
    "kv_channels": "model.head_dim", "ffn_hidden_size": "model.moe_ffn_hidden_size",
    "moe_ffn_hidden_size": "model.moe_ffn_hidden_size", "num_moe_experts": "model.num_experts",
    "moe_router_topk": "model.moe_router_topk", "moe_aux_loss_coeff": "model.moe_aux_loss_coeff",
    "moe_expert_capacity_factor": "model.moe_capacity_factor",
    "moe_token_drop_policy": "model.moe_token_drop_policy",
    "moe_token_dispatcher_type": "model.moe_token_dispatcher", "moe_router_dtype": "model.moe_router_dtype",
    "moe_router_pre_softmax": "model.moe_router_pre_softmax",
    "moe_router_score_function": "model.moe_router_score_function",
    "moe_router_num_groups": "model.moe_router_num_groups", "moe_router_group_topk": "model.moe_router_group_topk",
    "moe_router_topk_scaling_factor": "model.moe_router_topk_scaling_factor",
    "moe_router_load_balancing_type": "model.moe_router_load_balancing_type",
    "moe_router_enable_expert_bias": "model.moe_router_enable_expert_bias",
    "moe_router_bias_update_rate": "model.moe_router_bias_update_rate",
    "tensor_model_parallel_size": "parallel.tp", "pipeline_model_parallel_size": "parallel.pp",
    "virtual_pipeline_model_parallel_size": "parallel.vpp", "expert_model_parallel_size": "parallel.ep",
    "expert_tensor_parallel_size": "parallel.etp", "sequence_parallel": "parallel.sequence_parallel",
    "recompute_granularity": "train.recompute", "recompute_modules": "train.recompute",
    "recompute_method": "train.recompute", "bf16": "train.precision", "params_dtype": "train.precision",
    "overlap_grad_reduce": "engine.overlap_grad_reduce", "overlap_param_gather": "engine.overlap_param_gather",
    "use_distributed_optimizer": "train.use_distributed_optimizer", "bucket_size": "engine.bucket_size",
    "grad_reduce_in_fp32": "engine.grad_reduce_in_fp32", "lr": "train.lr", "min_lr": "train.min_lr",
    "weight_decay": "train.weight_decay", "clip_grad": "train.clip_grad", "adam_beta1": "train.adam_beta1",
    "adam_beta2": "train.adam_beta2", "adam_eps": "train.adam_eps",
}


def recipe_keys_in(message: str) -> list[str]:
    """The recipe keys a megatron message names, by field (``moe_router_topk``) or flag
    (``--moe-router-pre-softmax``), longest field first so ``moe_router_topk_scaling_factor`` wins."""
    words = {w.replace("-", "_").strip("_") for w in re.findall(r"[A-Za-z][A-Za-z0-9_-]+", message)}
    found = []
    for field in sorted(RECIPE_KEYS, key=len, reverse=True):
        if field in words and RECIPE_KEYS[field] not in found:
            found.append(RECIPE_KEYS[field])
    return found


def _refusal(what: str, exc: BaseException) -> ConfigError:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    keys = recipe_keys_in(msg)
    where = f"{', '.join(keys)}: " if keys else ""
    return ConfigError(f"{where}megatron-core refuses this {what}: {msg}"
                       f"{'' if keys else ' (megatron field names; see docs/training.md, recipe keys)'}")


def check_megatron_configs(cfg, layout):
    """Build megatron's TransformerConfig, DistributedDataParallelConfig and OptimizerConfig as the trainer
    will (same arguments); raise ConfigError naming the recipe key for any setting megatron rejects.
    Returns the TransformerConfig. ``train.precision: auto`` is checked as bf16 where CUDA is present."""
    import warnings

    from ..model.builder import to_transformer_config
    from .engine import resolve_switches

    m, t = cfg.model, cfg.train
    precision = None if t.precision == "auto" else t.precision
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = to_transformer_config(m, cfg.parallel, precision=precision, recompute=t.recompute,
                                           calculate_per_token_loss=t.stage == "sft",
                                           deterministic_mode=t.deterministic)
        except ConfigError:
            raise
        except (ValueError, AssertionError, TypeError, NotImplementedError) as exc:
            if str(exc).startswith("train.recompute"):
                raise ConfigError(str(exc)) from None
            raise _refusal("model/layout (TransformerConfig)", exc) from None
        switches = resolve_switches(cfg.engine, use_distributed_optimizer=t.use_distributed_optimizer, dp=layout.dp)
        try:
            from megatron.core.distributed import DistributedDataParallelConfig

            DistributedDataParallelConfig(
                grad_reduce_in_fp32=switches["grad_reduce_in_fp32"],
                overlap_grad_reduce=switches["overlap_grad_reduce"],
                overlap_param_gather=switches["overlap_param_gather"],
                use_distributed_optimizer=switches["use_distributed_optimizer"],
                check_for_nan_in_grad=switches["check_for_nan_in_grad"], bucket_size=switches["bucket_size"])
        except (ValueError, AssertionError, TypeError) as exc:
            raise _refusal("engine setting (DistributedDataParallelConfig)", exc) from None
        try:
            from megatron.core.optimizer import OptimizerConfig

            OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
                            clip_grad=t.clip_grad, bf16=config.bf16, fp16=False, params_dtype=config.params_dtype,
                            use_distributed_optimizer=t.use_distributed_optimizer)
        except (ValueError, AssertionError, TypeError) as exc:
            raise _refusal("optimizer setting (OptimizerConfig)", exc) from None
    return config


def applied_defaults(model) -> list[str]:
    """Settings the run applies differently from what the recipe literally says (logged at --check and start)."""
    from ..model.builder import backend_resolution

    notes = []
    resolution = backend_resolution(model.backend)
    if resolution:
        notes.append(resolution)
    if model.moe_router_pre_softmax is None and model.router_pre_softmax:
        notes.append("model.moe_router_pre_softmax is null and model.moe_router_topk is 1: routing with "
                     "megatron's pre-softmax (softmax over all experts, then the top-1; megatron refuses top-1 "
                     "without it). Set model.moe_router_pre_softmax explicitly to silence this line")
    return notes
