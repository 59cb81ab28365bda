"""gloo_uneven_all_gather: ``all_gather`` into tensors of unequal sizes works on gloo.

With TP>1 the MoE all-to-all dispatcher gathers each rank's routed tokens over the tensor-parallel
group (``gather_from_sequence_parallel_region`` with ``output_split_sizes``), which calls
``torch.distributed.all_gather`` with per-rank tensors of different lengths. NCCL accepts that; gloo
raises "All tensors in the list must have the same size". For gloo groups with unequal shapes only,
the patch pads each contribution to the longest along dim 0, gathers, and copies the true rows out.
Every other call goes straight to torch.
"""

import torch
import torch.distributed as dist

from ._base import Patch, Target, wrap_once


class _Completed:
    def wait(self, *args, **kwargs):
        return True

    def is_completed(self):
        return True


def _apply():
    def make(orig):
        def all_gather(tensor_list, tensor, group=None, async_op=False):
            if len({tuple(t.shape) for t in tensor_list} | {tuple(tensor.shape)}) <= 1 \
                    or dist.get_backend(group) != "gloo":
                return orig(tensor_list, tensor, group=group, async_op=async_op)
            rows = max(t.shape[0] for t in tensor_list)
            padded = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]))
            padded[: tensor.shape[0]].copy_(tensor)
            buffers = [torch.empty_like(padded) for _ in tensor_list]
            orig(buffers, padded, group=group)
            for out, buf in zip(tensor_list, buffers, strict=False):
                out.copy_(buf[: out.shape[0]])
            return _Completed() if async_op else None
        return all_gather

    wrap_once(dist, "all_gather", make)


PATCH = Patch(
    name="gloo_uneven_all_gather",
    when="cpu",
    summary="all_gather with unequal per-rank sizes is padded on gloo groups",
    why="TP>1 + alltoall dispatcher: gloo rejects all_gather of unequal tensor sizes",
    targets=[Target("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim",
                    ("input_", "group", "output_split_sizes"))],
    apply=_apply,
)
