"""The SciDFM model on megatron-core: presets, builder, accounting, global <-> sharded state dicts."""

from .accounting import ParamCount, count_parameters, tensor_shapes, training_flops_per_token
from .presets import PRESETS, get_preset

__all__ = ["PRESETS", "ParamCount", "count_parameters", "get_preset", "tensor_shapes",
           "training_flops_per_token"]
