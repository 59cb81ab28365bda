"""cpu_sharded_tensor_init: ``ShardedTensor.init_data("cuda")`` allocates on the CPU when CUDA is absent.

megatron-core's fully-parallel checkpoint load (``FullyParallelLoadStrategyWrapper``: each DP replica
reads a share of the replicated tensors, then they exchange them) allocates the receive buffers with
``sh_ten.init_data("cuda")`` (``dist_checkpointing/exchange_utils._get_empty_tensor_for_exchange``). The
allocation function is ``torch.empty`` captured as a default argument when megatron-core was imported,
so the ``cpu_device`` patch, which wraps the module-level factories, never sees it. The patch maps the
CUDA device of ``init_data`` to the CPU; the exchange then broadcasts CPU tensors over gloo (no numerics
involved). Symptom check: tests/test_resume.py::test_resume_matrix (a distributed-optimizer load at DP2
through the fully-parallel strategy).
"""

import torch

from ._base import Patch, Target, wrap_once

MODULE = "megatron.core.dist_checkpointing.mapping"


def _apply():
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from .cpu_device import is_cuda_device

    def make(orig):
        def init_data(self, device, init_fn=torch.empty):
            return orig(self, "cpu" if is_cuda_device(device) else device, init_fn)
        return init_data

    wrap_once(ShardedTensor, "init_data", make)


PATCH = Patch(
    name="cpu_sharded_tensor_init",
    when="cpu",
    summary="ShardedTensor.init_data('cuda') allocates on the CPU (fully-parallel checkpoint load)",
    why="FullyParallelLoadStrategyWrapper's exchange allocates receive buffers with init_data('cuda')",
    targets=[Target(MODULE, "ShardedTensor.init_data", ("device", "init_fn")),
             Target("megatron.core.dist_checkpointing.exchange_utils", "_get_empty_tensor_for_exchange")],
    apply=_apply,
)
