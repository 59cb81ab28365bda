"""RMSNorm for megatron-core's local (pure torch) layer spec.

megatron-core 0.16.1's local spec uses ``WrappedTorchNorm``, which asserts ``not config.sequence_parallel``,
while ``MoELayer`` *requires* sequence parallelism when TP>1. TENorm and apex's fused norms solve this by
tagging their weights ``sequence_parallel=True``: each TP rank normalises its own slice of the sequence,
so the weight's gradient is a partial sum that ``finalize_model_grads`` all-reduces over the TP group.
This class does the same with ``torch.nn.RMSNorm``, and is placed in the spec (no monkey-patching).
It also fixes the apex-without-TE case, where megatron picks apex ``FusedLayerNorm`` (LayerNorm only).
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with megatron's layer-norm signature and its weight tagged ``sequence_parallel``: the
    local spec's norm refuses sequence parallelism, which MoE with TP needs."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        if config.normalization != "RMSNorm" or zero_centered_gamma or config.layernorm_zero_centered_gamma:
            raise ValueError("scidfm_megatron.model.norm.RMSNorm implements plain RMSNorm only")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        # Gradient is a partial sum over the local sequence shard under SP: reduce it over TP.
        self.weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]  # megatron's flag
