"""Observe the MoE routers without copying them: forward hooks on megatron's ``TopKRouter``.

:class:`RouterRecorder` records, for every router call, the layer, the number of tokens it routed,
tokens per expert *after* capacity dropping (megatron's returned ``routing_map``) and, on request, the
per-expert sum over tokens of the gate logits ``h W_g`` (what SciDFM's expert-choice analysis needs).
The logits are recomputed in the hook from the router's input and weight, outside autograd.

With activation recomputation of the MoE layer the router runs again in the backward pass and is
recorded again: counts double, shares and dropped fractions (ratios) do not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RouterCall:
    """One router forward: the tokens each expert got (on the device) and, if asked, the per-sequence gate logits."""
    layer: int  # 1-based global layer number, as megatron numbers layers
    # tokens routed by this call: an int, or a 0-d device tensor (real tokens) when padding was masked
    num_tokens: object
    # [num_experts] int64, after dropping, on the router's device: the hook never synchronises with the
    # GPU; the trainer sums the step's calls there and copies one tensor to the host per step.
    tokens_per_expert: torch.Tensor
    # [batch, num_experts]: per sequence, the sum over its tokens of the gate logits h W_g (the
    # paper's expert-choice statistic before its softmax). Only with keep_logits=True.
    logits_sum: Optional[torch.Tensor] = None

    @property
    def routed(self) -> int:
        return int(self.tokens_per_expert.sum())


def expert_capacity(num_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor * num_tokens * topk / num_experts) (GShard / Switch)."""
    return math.ceil(num_tokens * topk * capacity_factor / num_experts)


class RouterRecorder:
    """Records every megatron ``TopKRouter`` call through forward hooks, so statistics and expert-choice
    analysis read the router's own numbers instead of re-implementing it."""

    def __init__(self, models, keep_logits: bool = False):
        from megatron.core.transformer.moe.router import TopKRouter

        models = models if isinstance(models, (list, tuple)) else [models]
        self.routers = [m for model in models for m in model.modules() if isinstance(m, TopKRouter)]
        self.keep_logits = keep_logits
        self.calls: list[RouterCall] = []
        self._handles: list = []  # torch hook handles, while recording

    def _hook(self, module, inputs, output):
        _, routing_map = output
        hidden = inputs[0]
        logits_sum = None
        if self.keep_logits:
            with torch.no_grad():
                h = hidden.float()  # [seq, batch, hidden]: megatron is sequence-first
                if h.dim() == 2:
                    h = h.unsqueeze(1)
                logits_sum = torch.einsum("sbh,eh->be", h, module.weight.float()).cpu()
        self.calls.append(RouterCall(
            layer=int(getattr(module, "layer_number", 0) or 0),
            num_tokens=(int(routing_map.shape[0]) if len(inputs) < 2 or inputs[1] is None
                        else (~inputs[1]).sum()),  # padding (True) is not routed
            tokens_per_expert=routing_map.detach().sum(0),
            logits_sum=logits_sum))

    def __enter__(self):
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def clear(self):
        self.calls = []
