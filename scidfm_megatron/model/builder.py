"""ModelConfig + ParallelConfig -> megatron-core ``TransformerConfig`` + layer spec -> ``GPTModel``.

The only place that knows megatron-core's config field names. Spec choice: TransformerEngine's spec when
TE imports and CUDA is present (fused kernels, grouped-GEMM experts), megatron-core's local spec
otherwise (pure torch: CPU, or GPUs without TE), with this project's sequence-parallel-aware RMSNorm.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..config import RECOMPUTE_MODULES, ModelConfig, ParallelConfig

PRECISIONS = ("fp32", "bf16")
# train.recompute: "selective" -> these megatron recompute modules, per backend (to_transformer_config).
SELECTIVE_RECOMPUTE = {"torch": ["moe_act"], "te-sdpa": ["moe_act"], "te": ["core_attn", "moe_act"],
                       "local": ["core_attn", "moe"]}
TE_BACKENDS = ("te", "te-sdpa")  # backends built on TransformerEngine's linears, norms and grouped experts


def have_te() -> bool:
    return resolve_backend("auto") in TE_BACKENDS


def attention_kind(backend: str, head_dim: int) -> str:
    """The core attention a resolved backend builds: "padded-sdpa" (PyTorch SDPA behind the head-dim padding:
    a fused kernel on CUDA), "te-fused" (TE's DotProductAttention at a head_dim its fused kernels take, a
    multiple of 8), "te-unfused" (TE's at another head_dim, e.g. SciDFM's 100: TE runs its unfused attention,
    s x s scores per head) or "unfused" (megatron's local DotProductAttention)."""
    if backend in ("torch", "te-sdpa"):
        return "padded-sdpa"
    if backend == "te":
        return "te-fused" if head_dim % 8 == 0 else "te-unfused"
    return "unfused"


def attention_kernel(model: ModelConfig, *, tp: int = 1, masked: bool = False, dtype=None,
                     backend: Optional[str] = None) -> str:
    """The attention kernel a run takes, for its first log line. The padded SDPA (``torch``, ``te-sdpa``):
    the kernel one small forward + backward at the model's head_dim, heads per TP rank and ``dtype`` takes on
    this device, with a document mask when ``masked`` (packed SFT): "SDPA flash", "SDPA cudnn", "SDPA
    efficient" or "SDPA math" on CUDA ("SDPA cpu-flash" is PyTorch's fused CPU kernel). Otherwise the
    attention the spec builds (TE's fused or unfused attention, megatron's unfused one)."""
    kind = attention_kind(resolve_backend(backend or model.backend), model.head_dim)
    if kind != "padded-sdpa":
        return {"te-fused": "TE fused attention", "te-unfused": "TE unfused attention (s x s scores)",
                "unfused": "unfused (megatron DotProductAttention, s x s scores)"}[kind]
    from .torch_backend import sdpa_kernel_taken

    try:
        return "SDPA " + sdpa_kernel_taken(max(1, model.num_attention_heads // tp), model.head_dim, masked=masked,
                                           dtype=dtype)
    except Exception as exc:  # noqa: BLE001  a log line never stops a run
        return f"SDPA (kernel not determined: {type(exc).__name__}: {exc})"


def sft_backend_error(model: ModelConfig) -> Optional[str]:
    """Packed SFT needs an attention that takes the document mask: every backend's but TE's own attention
    (it takes the causal mask type and ignores an explicit mask: packed conversations would see each other;
    megatron's THD path is not wired here). ``auto`` under TE builds ``te-sdpa``, whose padded SDPA takes it."""
    if resolve_backend(model.backend) == "te":
        return ("model.backend: te cannot isolate packed SFT conversations (TE's causal attention ignores the "
                "document mask); use model.backend: auto or te-sdpa (TE's linears and experts with the padded "
                "SDPA attention, which takes the mask)")
    return None


def chosen_pieces(model: ModelConfig, backend: Optional[str] = None) -> dict:
    """What ``model.backend`` (or ``backend``) builds on this machine, piece by piece: the resolved backend,
    the core attention (:func:`attention_kind`), the experts, the linear layers and the norms (the GPU
    check's environment probe records it; tests stub TE and the device to check the choice)."""
    b = resolve_backend(backend or model.backend)
    experts = {"te": "TEGroupedMLP", "te-sdpa": "TEGroupedMLP", "local": "SequentialMLP"}.get(b)
    if experts is None:  # torch: one torch._grouped_mm per linear where it runs and equals the loop
        from .torch_backend import grouped_mm_decision

        experts = "GroupedExperts (" + grouped_mm_decision() + ")"
    te = b in TE_BACKENDS
    return dict(backend=b, attention=attention_kind(b, model.head_dim), experts=experts,
                linear="TransformerEngine" if te else "megatron local", norm="TENorm" if te else "RMSNorm (torch)")


@functools.lru_cache(maxsize=None)
def resolve_backend(backend: Optional[str] = "auto") -> str:
    """``model.backend`` -> the spec actually built: "te-sdpa", "te", "torch" or "local".

    "auto" takes "te-sdpa" when TE imports and CUDA is present: TE's linears, norms and grouped-GEMM experts
    with the padded PyTorch SDPA as core attention (TE's own attention has no fused kernel at SciDFM's
    head_dim 100 and ignores the packed-SFT document mask; the padded SDPA is fused and takes the mask).
    Without TE, the ``torch`` backend on CUDA (PyTorch's fused kernels, model/torch_backend.py), and
    ``local`` on CPU. "te" is TE's spec as it comes (TE's attention). "torch" runs anywhere. A TE that is
    installed but fails to import (a build for another torch/CUDA) is not silently skipped: "auto" warns with
    the error (once per process: the answer is cached, as the builder asks for every config and every model chunk),
    "te" fails with it.
    """
    import logging
    import typing

    import megatron_patches

    from ..config import Backend, ConfigError, choice_error

    backend = backend or "auto"
    if backend in ("local", "torch"):
        return backend
    if backend not in typing.get_args(Backend):
        raise choice_error("model.backend", backend, typing.get_args(Backend))
    err = megatron_patches.transformer_engine_import_error()
    cuda = torch.cuda.is_available()
    if backend in TE_BACKENDS:
        if err is not None:
            raise ConfigError(f"model.backend is 'te' but TransformerEngine does not import: "
                              f"{type(err).__name__}: {err}. Install a TE build for this torch and CUDA "
                              f"(pip install transformer-engine[pytorch]), or set model.backend=local")
        if not cuda:
            raise ConfigError("model.backend is 'te' but CUDA is not available: TransformerEngine's modules run "
                              "on NVIDIA GPUs only; set model.backend=local (or auto) on this machine")
        return backend
    if cuda and err is not None and not isinstance(err, ModuleNotFoundError):
        logging.getLogger("scidfm.model").warning(
            "TransformerEngine is installed but does not import (%s: %s): using the torch backend. "
            "Set model.backend=te to make this an error.", type(err).__name__, err)
    if not cuda:
        return "local"
    return "te-sdpa" if err is None else "torch"


def backend_resolution(backend: Optional[str] = "auto") -> Optional[str]:
    """``model.backend: auto -> X (reason)``: what ``auto`` resolves to on this machine and why, the line the run
    logs once (rank 0) at --check and at start (training/megatron_check.py ``applied_defaults``); None for a
    backend given by name (built as written). The config keeps ``auto``: a checkpoint's recipe stays portable."""
    import megatron_patches

    if (backend or "auto") != "auto":
        return None
    resolved = resolve_backend("auto")
    if resolved == "te-sdpa":
        why = "TransformerEngine imports and CUDA is present"
    elif resolved == "torch":
        err = megatron_patches.transformer_engine_import_error()
        why = "CUDA is present, TransformerEngine does not import" + (f" ({type(err).__name__})" if err else "")
    else:
        why = "CUDA is not available"
    return f"model.backend: auto -> {resolved} ({why})"


def describe_implementations(chunks) -> dict:
    """Which classes implement attention, the experts, the router and the norms in this model: the run logs
    it, so a job that silently lost its fused kernels shows it on the first screen."""
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP, TEGroupedMLP

    found: dict[str, set] = {"attention": set(), "experts": set(), "norm": set(), "linear": set()}
    models = chunks if isinstance(chunks, (list, tuple)) else [chunks]
    for model in models:
        for m in (model.module if hasattr(model, "module") else model).modules():
            name = type(m).__name__
            if isinstance(m, Attention):
                found["attention"].add(type(m.core_attention).__name__)
            elif isinstance(m, (GroupedMLP, SequentialMLP, TEGroupedMLP)):
                found["experts"].add(name)
            elif "Norm" in name:
                found["norm"].add(f"{name} ({type(m).__module__.split('.')[0]})")
            elif "Linear" in name and "Parallel" in name:
                found["linear"].add(name)
    return {k: ", ".join(sorted(v)) or "-" for k, v in found.items()}


def default_precision() -> str:
    return "bf16" if torch.cuda.is_available() else "fp32"


def to_transformer_config(model: ModelConfig, par: ParallelConfig, *, precision: Optional[str] = None,
                          recompute: Optional[str] = None, calculate_per_token_loss: bool = False,
                          parallel: Optional[dict] = None, **extra):
    """The one adapter to megatron's TransformerConfig.

    parallel: the engine's :func:`~scidfm_megatron.training.engine.parallel_choices` (sequence parallelism,
    p2p communication); None asks it for ``par``'s (conversion, inference and tests build models without
    an engine).

    recompute: None, "full" (every layer, uniform), "selective" (the backend's selective set, below), or a
    comma-separated list of megatron's recompute modules ("core_attn,moe_act"). "selective" is the cheapest
    set that still drops the big activations: ``torch`` recomputes the experts' SwiGLU only (``moe_act``;
    its attention is fused: nothing s x s is stored), ``te`` the attention core and ``moe_act``, ``local``
    (per-expert MLPs: no ``moe_act``) the attention core and the whole MoE layer, which re-runs the router
    and the token all-to-all in the backward.
    ``extra`` passes further TransformerConfig fields through (for experiments), by their megatron names.
    """
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    from ..training.engine import parallel_choices

    precision = precision or default_precision()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cuda = torch.cuda.is_available()
    backend = resolve_backend(model.backend)
    te = backend in TE_BACKENDS
    recompute_kw = {}
    if recompute == "full":
        recompute_kw = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute is not None:
        modules = SELECTIVE_RECOMPUTE[backend] if recompute == "selective" else recompute.split(",")
        bad = sorted(set(modules) - set(RECOMPUTE_MODULES)) or (
            ["moe_act"] if "moe_act" in modules and backend == "local" else [])
        if bad:
            raise ValueError(f"train.recompute must be null, 'full', 'selective' or a comma-separated list of "
                             f"{', '.join(RECOMPUTE_MODULES)} (moe_act needs model.backend torch or te), "
                             f"got {recompute!r}")
        recompute_kw = dict(recompute_granularity="selective", recompute_modules=list(modules))

    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.moe_ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        # Mixture of experts; by default Mixtral-style: top-k over logits, softmax over the k chosen.
        num_moe_experts=model.num_experts,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_router_topk=model.moe_router_topk,
        moe_router_pre_softmax=model.router_pre_softmax,  # null: on for top-1 softmax routing only
        moe_router_score_function=model.moe_router_score_function,
        moe_router_num_groups=model.moe_router_num_groups,
        moe_router_group_topk=model.moe_router_group_topk,
        moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
        moe_router_load_balancing_type=model.moe_router_load_balancing_type,
        moe_router_enable_expert_bias=model.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=model.moe_router_bias_update_rate,
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_expert_capacity_factor=model.moe_capacity_factor,
        moe_token_drop_policy=model.moe_token_drop_policy,
        moe_pad_expert_input_to_capacity=False,
        moe_token_dispatcher_type=model.moe_token_dispatcher,
        moe_router_dtype=model.moe_router_dtype,
        # experts computed as one grouped GEMM (moe_act needs it)
        moe_grouped_gemm=backend in ("te", "te-sdpa", "torch"),
        moe_permute_fusion=False,
        # Parallelism.
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=par.etp,
        # sequence parallelism and the pipeline's p2p communication: the engine's choice
        **(parallel if parallel is not None else parallel_choices(par)),
        # Precision. On CPU, master weights are built on the host (megatron's CPU-init path).
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        fp16=False,
        use_cpu_initialization=not cuda,
        # Fusions need TE/apex kernels; without them megatron must take its unfused paths.
        gradient_accumulation_fusion=te,
        masked_softmax_fusion=te,
        bias_dropout_fusion=cuda,
        apply_rope_fusion=te,
        persist_layer_norm=False,
        calculate_per_token_loss=calculate_per_token_loss,
        **recompute_kw,
    )
    kwargs.update(extra)
    return TransformerConfig(**kwargs)


def layer_spec(model: ModelConfig, *, backend: Optional[str] = None):
    """The transformer layer ModuleSpec: "te" (TransformerEngine), "torch" (PyTorch's fused kernels,
    model/torch_backend.py) or "local" (megatron-core's unfused modules)."""
    from megatron.core.models.gpt import gpt_layer_specs

    from .packing import router_class

    backend = resolve_backend(backend or model.backend)
    if backend in TE_BACKENDS:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=model.num_experts, moe_grouped_gemm=True)
        if backend == "te-sdpa":  # TE's linears and experts, the padded fused SDPA as core attention
            import dataclasses

            from .torch_backend import attention_class

            attn = spec.submodules.self_attention.submodules
            spec.submodules.self_attention.submodules = dataclasses.replace(attn, core_attention=attention_class())
    elif backend == "local":
        from .norm import RMSNorm

        spec = gpt_layer_specs.get_gpt_layer_local_spec(
            num_experts=model.num_experts, moe_grouped_gemm=False, normalization="RMSNorm")
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
    elif backend == "torch":
        from .torch_backend import torch_layer_spec

        spec = torch_layer_spec(model.num_experts)
    else:
        raise ValueError(f"backend must be 'te', 'torch' or 'local', got {backend!r}")
    # Padding out of MoE dispatch, capacity and aux statistics (model/packing.py).
    spec.submodules.mlp.submodules.router = router_class()
    return spec


def block_spec(model: ModelConfig, config, *, backend: Optional[str] = None, vp_stage: Optional[int] = None):
    """Layer spec for this pipeline stage's layers plus the final norm, as a TransformerBlock spec."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    backend = resolve_backend(backend or model.backend)
    spec = layer_spec(model, backend=backend)
    if backend in TE_BACKENDS:
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        from .norm import RMSNorm as final_norm
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=final_norm)


def build_model(model: ModelConfig, par: ParallelConfig, *, precision: Optional[str] = None,
                config=None, backend: Optional[str] = None, vp_stage: Optional[int] = None,
                pre_process: Optional[bool] = None, post_process: Optional[bool] = None, **config_kw):
    """Build this rank's GPTModel shard. Requires :func:`scidfm_megatron.parallel.init_distributed`."""
    from megatron.core import parallel_state as ps

    from .packing import SciDFMGPTModel

    config = config or to_transformer_config(model, par, precision=precision, **config_kw)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    gpt = SciDFMGPTModel(
        config=config,
        transformer_layer_spec=block_spec(model, config, backend=backend, vp_stage=vp_stage),
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.max_seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not model.untie_embeddings,
        position_embedding_type="rope",
        rotary_base=model.rope_theta,
        vp_stage=vp_stage,
    )
    from ..device import device

    return gpt.to(device())


def build_model_chunks(model: ModelConfig, par: ParallelConfig, *, precision: Optional[str] = None,
                       backend: Optional[str] = None, **config_kw) -> list:
    """All model chunks of this rank: one, or ``vpp`` with the interleaved pipeline schedule."""
    config = to_transformer_config(model, par, precision=precision, **config_kw)
    stages = par.vpp or 1
    return [build_model(model, par, config=config, backend=backend,
                        vp_stage=(i if par.vpp else None)) for i in range(stages)]
