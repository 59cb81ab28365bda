"""cpu_device: megatron-core's ``"cuda"`` device requests land on the CPU when CUDA is absent.

megatron-core hard-codes ``device="cuda"``, ``device=torch.cuda.current_device()`` and ``.cuda()`` in
the pipeline schedules and p2p buffers, the MoE router and dispatchers, DDP grad buffers, the optimizer,
the global memory buffer, rotary embeddings and attention masks. On a CPU-only torch build each raises
"Torch not compiled with CUDA enabled".

The patch wraps torch's tensor factories, ``Tensor.new_*``, ``Tensor.to`` and ``Tensor.cuda``: when the
*immediate caller is megatron-core* and the requested device is CUDA, the device becomes ``cpu``. Calls
from any other code are untouched, so a user's own ``torch.zeros(2, device="cuda")`` still fails as it
should. Module-level wrapping (not a ``TorchFunctionMode``) is deliberate: autograd runs backward
functions with the mode stack popped, and megatron allocates CUDA buffers inside backward (tensor- and
sequence-parallel mappings). ``torch.cuda.current_device/set_device/synchronize`` become no-ops on
device 0. Set ``SCIDFM_TRACE_CPU_DEVICE=1`` to print each megatron call site that was remapped once.
"""

import functools
import os
import sys
from typing import Any

import torch

from ._base import Patch, Target, caller_is_megatron, mark_patched

_CPU = torch.device("cpu")
FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn",
             "randint", "randperm", "empty_strided", "zeros_like", "ones_like", "empty_like",
             "full_like", "rand_like", "randn_like", "linspace", "eye", "scalar_tensor")
TENSOR_FACTORIES = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")
_seen: set = set()


def is_cuda_device(d) -> bool:
    if isinstance(d, bool):
        return False
    if isinstance(d, int):  # a bare ordinal means cuda:N
        return True
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return False


def _trace():
    if os.environ.get("SCIDFM_TRACE_CPU_DEVICE") == "1":
        f = sys._getframe(2)
        key = (f.f_code.co_filename.split("site-packages/")[-1], f.f_lineno)
        if key not in _seen:
            _seen.add(key)
            print(f"[megatron_patches.cpu_device] cuda->cpu at {key[0]}:{key[1]}", file=sys.stderr)


def _wrap_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        d = kwargs.get("device")
        if d is not None and is_cuda_device(d) and caller_is_megatron():
            _trace()
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    mark_patched(wrapper)
    return wrapper


def _apply():
    if getattr(torch.Tensor.to, "__scidfm_patched__", False):
        return
    # torch's ``with torch.device(...)`` mode recognises factories by identity in a cached set built at
    # first use. Build it now, from the originals: built after the wrapping it would hold the wrappers,
    # the mode would stop placing factory calls on its device, and code that initialises on the meta
    # device (transformers' from_pretrained) would get uninitialised buffers (e.g. RoPE's inv_freq).
    from torch.utils import _device

    _device._device_constructors()
    for name in FACTORIES:
        setattr(torch, name, _wrap_factory(getattr(torch, name)))
    for name in TENSOR_FACTORIES:
        setattr(torch.Tensor, name, _wrap_factory(getattr(torch.Tensor, name)))

    orig_to, orig_cuda = torch.Tensor.to, torch.Tensor.cuda

    @functools.wraps(orig_to)
    def to(self, *args, **kwargs):
        if (args and is_cuda_device(args[0])) or is_cuda_device(kwargs.get("device")):
            if caller_is_megatron():
                _trace()
                if args and is_cuda_device(args[0]):
                    args = (_CPU,) + tuple(args[1:])
                else:
                    kwargs["device"] = _CPU
        return orig_to(self, *args, **kwargs)

    @functools.wraps(orig_cuda)
    def cuda(self, *args, **kwargs):
        if caller_is_megatron():
            _trace()
            return self
        return orig_cuda(self, *args, **kwargs)

    mark_patched(to)
    tensor: Any = torch.Tensor  # its methods are replaced at runtime; torch types them as fixed
    tensor.to, tensor.cuda = to, cuda
    torch.cuda.current_device = lambda: 0
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None


PATCH = Patch(
    name="cpu_device",
    when="cpu",
    summary="megatron-core's device='cuda' / .cuda() requests are served on the CPU",
    why="schedules, p2p, MoE, DDP buffers, rope and masks allocate on 'cuda' -> "
        "'Torch not compiled with CUDA enabled' on a CPU-only build",
    targets=[Target("megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining"),
             Target("megatron.core.pipeline_parallel.p2p_communication", "P2PCommunicator"),
             Target("megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBuffer")],
    apply=_apply,
)
