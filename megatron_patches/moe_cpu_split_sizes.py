"""moe_cpu_split_sizes: the MoE all-to-all dispatcher's split sizes become numpy arrays on the CPU too.

``MoEAlltoAllTokenDispatcher`` turns its per-rank split-size tensors into numpy arrays with
``maybe_move_tensor_to_cpu(t, as_numpy=True)``, which only converts *CUDA* tensors. On the CPU the sizes
stay torch tensors and ``ProcessGroup.all_to_all_single`` raises ``TypeError`` (it wants int lists).
The patch converts CPU tensors as the function already does for CUDA ones. The dispatcher imports the
function by name, so both module attributes are replaced.
"""

import torch

from ._base import Patch, Target, wrap_once

UTILS = "megatron.core.transformer.moe.moe_utils"
DISPATCHER = "megatron.core.transformer.moe.token_dispatcher"


def _apply():
    import megatron.core.transformer.moe.moe_utils as mu
    import megatron.core.transformer.moe.token_dispatcher as td

    def make(orig):
        def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
            if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
                return tensor.detach().numpy()
            return orig(tensor, as_numpy=as_numpy, record_stream=record_stream)
        return maybe_move_tensor_to_cpu

    td.maybe_move_tensor_to_cpu = wrap_once(mu, "maybe_move_tensor_to_cpu", make)  # imported there by name


PATCH = Patch(
    name="moe_cpu_split_sizes",
    when="cpu",
    summary="maybe_move_tensor_to_cpu(as_numpy=True) converts CPU tensors too",
    why="EP>1 with the alltoall dispatcher: all_to_all_single TypeError on tensor split sizes",
    targets=[Target(UTILS, "maybe_move_tensor_to_cpu", ("tensor", "as_numpy", "record_stream")),
             Target(DISPATCHER, "maybe_move_tensor_to_cpu", ("tensor", "as_numpy", "record_stream"))],
    apply=_apply,
)
