"""Named model presets. ``scidfm-18b`` is exactly the release architecture (see shared/SCIDFM.md);
the tiny ones keep its shape rules (MHA with head_dim*heads == hidden, 8 experts top-2, SwiGLU experts,
untied embeddings) at sizes a 2-core laptop trains in minutes."""

from __future__ import annotations

import dataclasses

from ..config import ConfigError, ModelConfig

SCIDFM_VOCAB = 32196  # 32191 SentencePiece pieces + 5 added tokens in the public release

PRESETS: dict[str, ModelConfig] = {
    # SciDFM-MoE-A5.6B: paper Table 1 and the release config.json.
    "scidfm-18b": ModelConfig(
        name="scidfm-18b", num_layers=26, hidden_size=3200, num_attention_heads=32, num_query_groups=32,
        head_dim=100, moe_ffn_hidden_size=8640, num_experts=8, moe_router_topk=2, vocab_size=SCIDFM_VOCAB,
        max_seq_length=8192, rope_theta=10000.0, rms_norm_eps=1e-6, untie_embeddings=True,
        moe_aux_loss_coeff=0.02, moe_capacity_factor=1.0),
    # ~12M parameters, the science tokenizer's vocabulary: the README's main job trains this on CPU.
    "scidfm-tiny": ModelConfig(
        name="scidfm-tiny", num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=4,
        head_dim=32, moe_ffn_hidden_size=256, num_experts=8, moe_router_topk=2, vocab_size=SCIDFM_VOCAB,
        max_seq_length=256),
    # ~0.3M parameters, toy vocabulary: unit and parallel-parity tests (4 layers so PP2 and PP4 work).
    "scidfm-debug": ModelConfig(
        name="scidfm-debug", num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=4,
        head_dim=16, moe_ffn_hidden_size=96, num_experts=8, moe_router_topk=2, vocab_size=500,
        max_seq_length=64),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A fresh copy of preset ``name`` with field overrides; unknown names list the valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    try:
        cfg = dataclasses.replace(PRESETS[name], **overrides)
    except TypeError as exc:
        raise ConfigError(f"preset {name!r}: {exc}") from None
    cfg.validate()
    return cfg
