"""cpu_tensor_type: ``Tensor.type()`` called by megatron-core reports CUDA type names on the CPU.

megatron-core's optimizers and grad clipping test ``param.type() == 'torch.cuda.FloatTensor'``
(``clip_grad_by_total_norm_fp32``, ``Float16OptimizerWithFloat16Params``, ``DistributedOptimizer``) and
raise "Wrapped parameters must be one of torch.cuda.FloatTensor, ..." for CPU tensors. Only calls made
from megatron-core code see the CUDA name; everyone else gets torch's answer.
"""

import functools

import torch

from ._base import Patch, Target, caller_is_megatron, wrap_once


def _apply():
    def make(orig):
        @functools.wraps(orig)
        def type_(self, dtype=None, non_blocking=False, **kwargs):
            name = orig(self, dtype, non_blocking, **kwargs)
            if dtype is None and not kwargs and isinstance(name, str) and name.startswith("torch.") \
                    and not name.startswith("torch.cuda.") and caller_is_megatron():
                return "torch.cuda." + name[len("torch."):]
            return name
        return type_

    wrap_once(torch.Tensor, "type", make)


PATCH = Patch(
    name="cpu_tensor_type",
    when="cpu",
    summary="Tensor.type() reports 'torch.cuda.*' names to megatron-core callers",
    why="optimizer and clip_grad_by_total_norm_fp32 assert param.type() == 'torch.cuda.FloatTensor'",
    targets=[Target("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
                    ("parameters", "max_norm", "total_norm")),
             Target("megatron.core.optimizer.optimizer", "FP32Optimizer")],
    apply=_apply,
)
