"""Parameter and FLOP accounting from a ModelConfig alone (no model is built).

``tensor_shapes`` lists every tensor of the global state dict (same names and shapes as
:mod:`.state_dict`), so the counts are checked against real models in the tests, not just a formula.

Conventions (so the numbers can be compared with papers):
* *total*: every parameter, input embedding and output layer included.
* *active*: what one token uses: everything except the (num_experts - topk) unchosen experts per layer.
* *non-embedding*: without the input embedding and output layer.
SciDFM's paper quotes 18.2B total / 5.6B active. With the release's shapes the model has 18.52B
parameters (matching its ~37 GB of bf16 weights); 18.2B is close to the non-embedding total (18.32B,
0.6% away) and 5.6B to the active count with embeddings (5.58B). ``scidfm-info`` prints all four.

Training FLOPs per token follow the PaLM paper's appendix B (the usual MFU definition):
``6 * N_matmul_active + 12 * n_layers * seq_len * attention_width``, where N_matmul_active counts the
weights a token multiplies by (attention, router, its top-k experts, output layer; not the embedding
lookup or norms) and the second term is QK^T and attention-times-V, forward and backward, without
discounting the causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig


@dataclass(frozen=True)
class TensorShape:
    name: str
    shape: tuple[int, ...]
    kind: str  # embedding | output | attention | norm | router | expert
    expert: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def tensor_shapes(cfg: ModelConfig, padded_vocab: bool = True) -> list[TensorShape]:
    """Every tensor of the global (unsharded) state dict, in megatron-core's local-spec names."""
    v = cfg.padded_vocab_size if padded_vocab else cfg.vocab_size
    h, a = cfg.hidden_size, cfg.attention_width
    kv = cfg.num_query_groups * cfg.head_dim
    f = cfg.moe_ffn_hidden_size
    out = [TensorShape("embedding.word_embeddings.weight", (v, h), "embedding")]
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        out += [
            TensorShape(p + "input_layernorm.weight", (h,), "norm"),
            TensorShape(p + "self_attention.linear_qkv.weight", (a + 2 * kv, h), "attention"),
            TensorShape(p + "self_attention.linear_proj.weight", (h, a), "attention"),
            TensorShape(p + "pre_mlp_layernorm.weight", (h,), "norm"),
            TensorShape(p + "mlp.router.weight", (cfg.num_experts, h), "router"),
        ]
        for e in range(cfg.num_experts):
            q = f"{p}mlp.experts.local_experts.{e}."
            out += [TensorShape(q + "linear_fc1.weight", (2 * f, h), "expert", True),
                    TensorShape(q + "linear_fc2.weight", (h, f), "expert", True)]
    out.append(TensorShape("decoder.final_layernorm.weight", (h,), "norm"))
    if cfg.untie_embeddings:
        out.append(TensorShape("output_layer.weight", (v, h), "output"))
    return out


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int
    embedding: int  # input embedding + output layer
    non_embedding: int
    active_non_embedding: int
    per_layer: int
    per_expert: int

    def as_dict(self) -> dict:
        return dict(total=self.total, active=self.active, embedding=self.embedding,
                    non_embedding=self.non_embedding, active_non_embedding=self.active_non_embedding,
                    per_layer=self.per_layer, per_expert=self.per_expert)


def count_parameters(cfg: ModelConfig, padded_vocab: bool = True) -> ParamCount:
    shapes = tensor_shapes(cfg, padded_vocab)
    total = sum(t.numel for t in shapes)
    expert = sum(t.numel for t in shapes if t.expert)
    inactive = expert * (cfg.num_experts - cfg.moe_router_topk) // cfg.num_experts
    emb = sum(t.numel for t in shapes if t.kind in ("embedding", "output"))
    per_layer = sum(t.numel for t in shapes if t.name.startswith("decoder.layers.0."))
    per_expert = sum(t.numel for t in shapes if ".local_experts.0." in t.name
                     and t.name.startswith("decoder.layers.0."))
    return ParamCount(total=total, active=total - inactive, embedding=emb, non_embedding=total - emb,
                      active_non_embedding=total - inactive - emb, per_layer=per_layer,
                      per_expert=per_expert)


def matmul_params_per_token(cfg: ModelConfig, padded_vocab: bool = True) -> int:
    """Weights one token is multiplied by in the forward pass (the N in 6N)."""
    shapes = tensor_shapes(cfg, padded_vocab)
    dense = sum(t.numel for t in shapes if t.kind in ("attention", "router", "output"))
    experts = sum(t.numel for t in shapes if t.expert) * cfg.moe_router_topk // cfg.num_experts
    return dense + experts


def training_flops_per_token(cfg: ModelConfig, seq_len: int | None = None, padded_vocab: bool = True) -> int:
    """Model FLOPs per trained token (forward + backward), PaLM appendix-B convention."""
    s = seq_len or cfg.max_seq_length
    return 6 * matmul_params_per_token(cfg, padded_vocab) + 12 * cfg.num_layers * s * cfg.attention_width
