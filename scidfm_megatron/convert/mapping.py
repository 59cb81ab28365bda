"""The megatron-core <-> Hugging Face (Mixtral layout) mapping, as tables: one :class:`Rule` per global
megatron tensor (copy, vocab, qkv, fc1), layout-free (docs/conversion.md, "The mapping")."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ModelConfig


@dataclass(frozen=True)
class Rule:
    """One megatron tensor (a name pattern) and its Hugging Face tensor(s), with the kind of transform between them."""
    mcore: str  # pattern; {L} = layer, {E} = expert
    hf: tuple[str, ...]
    kind: str  # copy | vocab | qkv | fc1


_HF_LAYER = "model.layers.{L}."
_MOE = _HF_LAYER + "block_sparse_moe."
RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("decoder.layers.{L}.input_layernorm.weight", (_HF_LAYER + "input_layernorm.weight",), "copy"),
    Rule("decoder.layers.{L}.self_attention.linear_qkv.weight",
         (_HF_LAYER + "self_attn.q_proj.weight", _HF_LAYER + "self_attn.k_proj.weight",
          _HF_LAYER + "self_attn.v_proj.weight"), "qkv"),
    Rule("decoder.layers.{L}.self_attention.linear_proj.weight", (_HF_LAYER + "self_attn.o_proj.weight",), "copy"),
    Rule("decoder.layers.{L}.pre_mlp_layernorm.weight", (_HF_LAYER + "post_attention_layernorm.weight",), "copy"),
    Rule("decoder.layers.{L}.mlp.router.weight", (_MOE + "gate.weight",), "copy"),
    Rule("decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1.weight",
         (_MOE + "experts.{E}.w1.weight", _MOE + "experts.{E}.w3.weight"), "fc1"),
    Rule("decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc2.weight", (_MOE + "experts.{E}.w2.weight",),
         "copy"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab"),
)


@dataclass(frozen=True)
class TensorMap:
    """One megatron tensor and the HF tensors made from it (a conversion unit)."""

    mcore: str
    hf: tuple[str, ...]
    kind: str
    layer: Optional[int]


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every conversion unit of a model, in Hugging Face order (embedding, layers, norm, head)."""
    out = []
    for r in RULES:
        if r.mcore == "output_layer.weight" and not cfg.untie_embeddings:
            continue
        layers = range(cfg.num_layers) if "{L}" in r.mcore else [None]
        for layer in layers:
            experts = range(cfg.num_experts) if "{E}" in r.mcore else [None]
            for e in experts:
                fmt = dict(L=layer, E=e)
                out.append(TensorMap(r.mcore.format(**fmt), tuple(h.format(**fmt) for h in r.hf), r.kind, layer))
    order = {"embedding": 0, "decoder.layers": 1, "decoder.final": 2, "output": 3}
    return sorted(out, key=lambda m: (next(v for k, v in order.items() if m.mcore.startswith(k)),
                                      -1 if m.layer is None else m.layer))


def hf_shapes(m: TensorMap, cfg: ModelConfig) -> list[tuple[int, ...]]:
    """The HF shapes a config implies for unit ``m`` (checked against what is read, and used to plan
    the output files before any tensor is read)."""
    h, d = cfg.hidden_size, cfg.head_dim
    if m.kind == "vocab":
        return [(cfg.vocab_size, h)]
    if m.kind == "qkv":
        return [(cfg.num_attention_heads * d, h), (cfg.num_query_groups * d, h), (cfg.num_query_groups * d, h)]
    if m.kind == "fc1":
        return [(cfg.moe_ffn_hidden_size, h)] * 2
    name = m.mcore
    if name.endswith("layernorm.weight"):
        return [(h,)]
    if name.endswith("linear_proj.weight"):
        return [(h, cfg.num_attention_heads * d)]
    if name.endswith("router.weight"):
        return [(cfg.num_experts, h)]
    if name.endswith("linear_fc2.weight"):
        return [(h, cfg.moe_ffn_hidden_size)]
    raise KeyError(f"no HF shape rule for {name}")


def mcore_shape(m: TensorMap, cfg: ModelConfig) -> tuple[int, ...]:
    h, d = cfg.hidden_size, cfg.head_dim
    if m.kind == "vocab":
        return (cfg.padded_vocab_size, h)
    if m.kind == "qkv":
        return ((cfg.num_attention_heads + 2 * cfg.num_query_groups) * d, h)
    if m.kind == "fc1":
        return (2 * cfg.moe_ffn_hidden_size, h)
    return hf_shapes(m, cfg)[0]


def to_hf(m: TensorMap, t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Megatron tensor -> its HF tensors (contiguous)."""
    if m.kind == "copy":
        return [t.contiguous()]
    if m.kind == "vocab":
        return [t[: cfg.vocab_size].contiguous()]
    if m.kind == "fc1":
        w1, w3 = t.chunk(2, dim=0)
        return [w1.contiguous(), w3.contiguous()]
    if m.kind == "qkv":
        g, d, h = cfg.num_query_groups, cfg.head_dim, t.shape[-1]
        per = cfg.num_attention_heads // g
        w = t.view(g, per + 2, d, h)
        return [w[:, :per].reshape(g * per * d, h).contiguous(), w[:, per].reshape(g * d, h).contiguous(),
                w[:, per + 1].reshape(g * d, h).contiguous()]
    raise ValueError(f"unknown mapping kind {m.kind!r}")


def to_mcore(m: TensorMap, ts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """HF tensors -> the megatron tensor (exact inverse of :func:`to_hf` on the real rows)."""
    if m.kind == "copy":
        return ts[0].contiguous()
    if m.kind == "vocab":
        t = ts[0]
        out = t.new_zeros((cfg.padded_vocab_size, t.shape[1]))
        out[: t.shape[0]] = t
        return out
    if m.kind == "fc1":
        return torch.cat(ts, dim=0)
    if m.kind == "qkv":
        q, k, v = ts
        g, d, h = cfg.num_query_groups, cfg.head_dim, q.shape[-1]
        per = cfg.num_attention_heads // g
        return torch.cat([q.view(g, per, d, h), k.view(g, 1, d, h), v.view(g, 1, d, h)], dim=1).reshape(-1, h)
    raise ValueError(f"unknown mapping kind {m.kind!r}")


# --------------------------------------------------------------------------------------- config
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


SIDECAR = "scidfm_megatron.json"  # next to config.json: the run's ModelConfig, for the way back


def check_mixtral_routing(cfg: ModelConfig, source: str) -> None:
    """Mixtral routes by a softmax over all experts, the top-k, renormalised over those k: megatron's default
    (softmax over the top-k logits), nothing else. A model trained with other router settings would load in
    transformers and compute something else, so the export refuses it, naming the key."""
    from ..config import ConfigError

    other = [f"{k}={v}" for k, v, plain in (
        ("moe_router_pre_softmax", cfg.router_pre_softmax, False),
        ("moe_router_score_function", cfg.moe_router_score_function, "softmax"),
        ("moe_router_num_groups", cfg.moe_router_num_groups, None),
        ("moe_router_topk_scaling_factor", cfg.moe_router_topk_scaling_factor, None),
        ("moe_router_enable_expert_bias", cfg.moe_router_enable_expert_bias, False)) if v != plain]
    if other:
        raise ConfigError(f"{source}: model.{', model.'.join(other)}: a Hugging Face Mixtral routes by softmax over "
                          f"the top-k (megatron's defaults; top-1 gives every token weight 1), so this model would "
                          f"compute something else there; evaluate the megatron checkpoint itself (scidfm-evaluate "
                          f"--model CHECKPOINT)")


def hf_config(cfg: ModelConfig, *, dtype: str, token_ids: Optional[dict] = None):
    """transformers' own ``MixtralConfig`` for this model: ``save_pretrained`` writes it exactly as
    transformers writes any Mixtral (only the values that differ from its defaults). ``token_ids``:
    bos/eos/pad ids to record (those left out keep transformers' defaults)."""
    from transformers import MixtralConfig

    ids = {f"{k}_token_id": v for k, v in (token_ids or {}).items() if k in ("bos", "eos", "pad")}
    return MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.moe_ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_length, initializer_range=cfg.init_method_std,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=not cfg.untie_embeddings, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.moe_router_topk, router_aux_loss_coef=cfg.moe_aux_loss_coeff,
        attention_dropout=cfg.attention_dropout, architectures=["MixtralForCausalLM"],
        dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype], **ids,
    )


def model_config_from_hf(hf: dict, source: str = "config.json", saved: Optional[dict] = None) -> ModelConfig:
    """ModelConfig from a Mixtral-layout ``config.json`` (ours, the SciDFM release's, any Mixtral).

    ``saved``: the run's ModelConfig as our export keeps it (``scidfm_megatron.json``; older exports kept
    it under config.json's ``scidfm_megatron`` key): it restores fields HF has no name for (capacity
    factor, vocabulary padding). Without it the model is Mixtral's: dropless routing (no capacity factor),
    as transformers runs it; a training recipe sets its own ``model.moe_capacity_factor``."""
    import dataclasses

    from ..config import ConfigError, from_dict

    saved = saved or (hf.get("scidfm_megatron") or {}).get("model")
    base = from_dict(ModelConfig, saved) if saved else None

    def need(key, *alts):
        for k in (key, *alts):
            if k in hf and hf[k] is not None:
                return hf[k]
        raise ConfigError(f"{source}: missing field {key!r} (a Mixtral-style config needs it)")

    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    rope = hf.get("rope_parameters") or {}
    fields = dict(
        num_layers=need("num_hidden_layers"), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads, moe_ffn_hidden_size=need("intermediate_size"),
        num_experts=need("num_local_experts"), moe_router_topk=need("num_experts_per_tok"),
        vocab_size=need("vocab_size"), max_seq_length=need("max_position_embeddings"),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        untie_embeddings=not hf.get("tie_word_embeddings", False),
        moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.02)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)))
    if base is None:
        cfg = ModelConfig(name=hf.get("_name_or_path") or "hf-import", moe_capacity_factor=None, **fields)
    else:
        cfg = dataclasses.replace(base, **fields)
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"{source}: rope_parameters.rope_type {rope['rope_type']!r}; only plain RoPE ('default') "
                          "is supported")
    window = hf.get("sliding_window")
    if window is not None and window < fields["max_seq_length"]:
        raise ConfigError(f"{source}: sliding_window {window} < max_position_embeddings {fields['max_seq_length']}; "
                          "this model family attends to the whole sequence (no sliding-window attention)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {hf['hidden_act']!r}; SciDFM/Mixtral experts use 'silu' (SwiGLU)")
    cfg.validate()
    return cfg

