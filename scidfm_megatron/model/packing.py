"""Packed sequences and padding on megatron-core: attention and rotary positions per document, padding kept
out of MoE routing, capacity and the aux loss, and the aux loss scaled for the per-token SFT loss
(docs/training.md, "Packed SFT, padding and the aux loss")."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

_AUX_TOKEN_SCALE: list[Optional[torch.Tensor]] = [None]


@contextlib.contextmanager
def aux_token_scale(scale: Optional[torch.Tensor]):
    """Within the block, routers multiply the per-token aux loss by ``scale`` (0-d tensor; None = 1)."""
    _AUX_TOKEN_SCALE[0] = scale
    try:
        yield
    finally:
        _AUX_TOKEN_SCALE[0] = None


def document_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] document ids -> megatron's attention mask [b, 1, s, s], True where attention is *not*
    allowed: a token sees earlier tokens of its own document only (block-diagonal causal). Padding
    (id -1) forms its own block, which no real token sees."""
    s = document_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).triu_(1)
    other = document_ids[:, :, None] != document_ids[:, None, :]
    return (other | causal).unsqueeze(1)


def _gpt_model_class():
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel

    class SciDFMGPTModel(GPTModel):
        """megatron's GPTModel with per-sample rotary positions for packed sequences (used when a
        document ``attention_mask`` is given), and the MoE padding mask carried to the pipeline stages
        that have no embedding (megatron scatters it for sequence parallelism only on the first stage)."""

        _positions_for_rope = False

        def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
            self._positions_for_rope = attention_mask is not None and position_ids is not None
            try:
                return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
            finally:
                self._positions_for_rope = False

        def _preprocess(self, input_ids, position_ids, *args, **kwargs):
            out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
            rotary, padding_mask = out[1], out[5]
            if self._positions_for_rope and rotary is not None:
                if isinstance(rotary, tuple):
                    raise NotImplementedError("packed sequences with separate q/k rotary embeddings")
                # [s, 1, 1, d] table rows at each sample's positions -> [s, b, 1, d]
                # (positions lie in [0, s): each restarts inside the sequence, never beyond it)
                rotary = rotary[position_ids.t()].squeeze(2)
            if padding_mask is not None and not self.pre_process and self.config.sequence_parallel:
                padding_mask = tensor_parallel.scatter_to_sequence_parallel_region(
                    padding_mask.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()
            return (out[0], rotary, *out[2:5], padding_mask, *out[6:])

    return SciDFMGPTModel


def capacity_drop_on_device(probs: torch.Tensor, routing_map: torch.Tensor, real: torch.Tensor, topk: int,
                            capacity_factor: float, drop_policy: str = "probs"):
    """megatron's expert-capacity dropping (``apply_router_token_dropping`` without pad-to-capacity) over the
    real tokens only, without a device-to-host copy: the capacity ceil(n_real x topk / E x capacity_factor)
    (megatron's ``get_capacity``, the same float64 arithmetic) stays a device tensor, and each expert keeps
    its routed real tokens whose rank is below it: by probability ("probs": the largest, as megatron's
    top-k; ties kept in token order) or by position ("position": the earliest). ``probs`` and
    ``routing_map`` [tokens, experts] are already zero / False on padding (``real`` False)."""
    num_experts = probs.shape[1]
    n_real = real.sum(dtype=torch.float64)
    capacity = torch.ceil(n_real * topk / num_experts * capacity_factor)
    if drop_policy == "probs":
        order = torch.argsort(probs.masked_fill(~routing_map, -1.0), dim=0, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            0, order, torch.arange(probs.shape[0], device=probs.device).unsqueeze(1).expand_as(order))
        keep = rank < capacity
    elif drop_policy == "position":
        keep = routing_map.cumsum(0) <= capacity
    else:
        raise ValueError(f"Invalid drop_policy: {drop_policy}")
    routing_map = routing_map & keep
    return probs * routing_map.to(probs.dtype), routing_map


def _router_class():
    from megatron.core.transformer.moe.moe_utils import (
        apply_router_token_dropping,
        compute_routing_scores_for_aux_loss,
        topk_routing_with_score_function,
    )
    from megatron.core.transformer.moe.router import TopKRouter

    class PaddingAwareRouter(TopKRouter):
        """megatron's top-k router with padding kept out of dispatch, capacity and aux statistics."""

        def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
            if padding_mask is None:
                return super().routing(logits)
            if self.routing_type == "sinkhorn" or self.router_replay is not None:
                raise NotImplementedError("padding-aware routing supports top-k routing with aux loss")
            seq_length, bsz = logits.shape[:2]
            logits = logits.view(-1, self.config.num_moe_experts)
            pad = padding_mask.reshape(-1)
            logits = self.apply_z_loss(logits, padding_mask=pad)
            probs, routing_map = topk_routing_with_score_function(
                logits, self.topk, use_pre_softmax=self.config.moe_router_pre_softmax,
                num_groups=self.config.moe_router_num_groups, group_topk=self.config.moe_router_group_topk,
                scaling_factor=self.config.moe_router_topk_scaling_factor, score_function=self.score_function,
                expert_bias=self.expert_bias, fused=self.config.moe_router_fusion)
            real = ~pad
            routing_map = routing_map & real.unsqueeze(-1)
            probs = probs * real.unsqueeze(-1).to(probs.dtype)
            cf = self.config.moe_expert_capacity_factor
            if cf is not None and not self.config.moe_pad_expert_input_to_capacity:
                if _sequence_parallel_group(self.config):
                    probs, routing_map = _drop_over_sequence(probs, routing_map, real, self.topk, self.config)
                else:
                    # Capacity from the real tokens only, computed and applied on the device: no host sync.
                    probs, routing_map = capacity_drop_on_device(probs, routing_map, real, self.topk, cf,
                                                                 self.config.moe_token_drop_policy)
            elif cf is not None:
                # pad_to_capacity (not used by this project's configs): megatron's own dropping over the real
                # tokens, which needs their indices on the host.
                idx = real.nonzero().squeeze(-1)
                p, m = apply_router_token_dropping(
                    probs.index_select(0, idx), routing_map.index_select(0, idx), router_topk=self.topk,
                    capacity_factor=self.config.moe_expert_capacity_factor,
                    drop_policy=self.config.moe_token_drop_policy,
                    pad_to_capacity=self.config.moe_pad_expert_input_to_capacity)
                probs = torch.zeros_like(probs).index_copy(0, idx, p)
                routing_map = torch.zeros_like(routing_map).index_copy(0, idx, m)
            if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
                map_aux, scores_aux = compute_routing_scores_for_aux_loss(
                    logits, self.topk, self.score_function, fused=self.config.moe_router_fusion,
                    padding_mask=pad)
                probs = self._apply_aux_loss(probs, scores_aux, map_aux, with_padding_mask=True)
                probs = self._apply_seq_aux_loss(probs, scores_aux, map_aux, seq_length, bsz,
                                                 with_padding_mask=True)
                probs = self._apply_global_aux_loss(probs, scores_aux, map_aux, with_padding_mask=True)
            self._apply_expert_bias(routing_map, padding_mask=pad)
            return probs, routing_map

        def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name,
                                               reduce_group, reduce_group_has_dp=False, valid_token_count=None):
            scale = _AUX_TOKEN_SCALE[0]
            if self.calculate_per_token_loss and scale is not None:
                if valid_token_count is None:
                    valid_token_count = activation.shape[0]
                valid_token_count = valid_token_count * scale
            return super().attach_and_log_load_balancing_loss(
                activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
                reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count)

    return PaddingAwareRouter


def _sequence_parallel_group(config):
    """The TP group when this rank routes only its share of the sequence (sequence parallelism, TP > 1)
    and the capacity decision can be made over the whole sequence (not with experts padded to capacity,
    whose dispatch expects every rank's own fixed capacity); else None."""
    if not config.sequence_parallel or config.moe_pad_expert_input_to_capacity:
        return None
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


def _drop_over_sequence(probs, routing_map, real, topk: int, config):
    """Capacity dropping decided over the real tokens of the whole micro-batch, as TP=1 decides it.

    Under sequence parallelism each TP rank routes its own share of the sequence, and megatron computes
    each expert's capacity per rank from that share. Padding at the end of a sample moves real tokens
    between the ranks' shares, so the same real tokens would be dropped differently with and without
    padding (1.1e-2 in the loss at TP2: tests/test_packing.py with this disabled). Here the ranks' routing
    decisions (no gradient) are gathered over the TP group, in sequence order (rank r holds positions
    [r*s/tp, (r+1)*s/tp) of every sample: the gathered rows are TP=1's rows), the capacity is applied to
    the real tokens among them exactly as at TP=1, and each rank keeps its own rows of the result.
    Gradients flow through this rank's probabilities, masked by the decision."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    world, rank = group.size(), ps.get_tensor_model_parallel_rank()

    def gather(x):
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    n = probs.shape[0]
    all_probs = gather(probs.detach())
    all_map = gather(routing_map.to(torch.uint8)).bool()
    all_real = gather(real.to(torch.uint8)).bool()
    _, kept = capacity_drop_on_device(all_probs, all_map, all_real, topk, config.moe_expert_capacity_factor,
                                      config.moe_token_drop_policy)  # TP=1's decision, without a host sync
    keep = kept[rank * n:(rank + 1) * n]
    return probs * keep.to(probs.dtype), keep


_CLASSES: dict = {}


def SciDFMGPTModel(*args, **kwargs):  # noqa: N802 - a class factory, imported lazily (megatron is heavy)
    cls = _CLASSES.get("gpt") or _CLASSES.setdefault("gpt", _gpt_model_class())
    return cls(*args, **kwargs)


def router_class():
    return _CLASSES.get("router") or _CLASSES.setdefault("router", _router_class())
