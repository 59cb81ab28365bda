"""The one notion of device: where this process's model, batches and collective tensors live.

* :func:`device` - the training device: ``cuda:<LOCAL_RANK>`` when CUDA is present, else the CPU. The model
  builder, the data path, inference and the tools all ask here instead of deciding for themselves.
* :func:`comm_device` - where a tensor given to a collective must live: NCCL takes CUDA tensors only,
  gloo takes CPU tensors (and CUDA ones through a copy). Scalars the trainer reduces (loss sums, the
  stop flag, expert loads) are made there, so the same code runs under NCCL and gloo.
* :func:`to_device` - a batch to the device: pinned host memory, non-blocking copy (CUDA), a no-op on CPU.
"""

from __future__ import annotations

from typing import Optional

import torch


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_device(group=None) -> torch.device:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch: dict, dev: Optional[torch.device] = None) -> dict:
    """Every tensor of ``batch`` on ``dev`` (default: :func:`device`). From the CPU to a GPU the copy
    goes through pinned memory and does not block the host, so it overlaps with queued GPU work."""
    dev = dev or device()
    if dev.type == "cpu":
        return batch
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.device != dev:
            v = v.pin_memory().to(dev, non_blocking=True) if v.device.type == "cpu" else v.to(dev)
        out[k] = v
    return out
