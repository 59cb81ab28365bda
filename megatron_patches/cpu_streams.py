"""cpu_streams: ``torch.cuda.Stream/Event/current_stream`` are CPU stand-ins when CUDA is absent.

The MoE all-to-all token dispatcher creates a side ``torch.cuda.Stream()`` for device-to-host copies of
split sizes, and DDP / the schedules record events. CPU work is synchronous, so a stream that runs work
immediately and events that are always complete are exact stand-ins (no numerics involved).
"""

from typing import Any

import torch

from ._base import Patch, Target


class CpuStream(torch.cpu.Stream):
    """A CUDA stream stand-in that runs everything synchronously on the CPU."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def record_event(self, event=None):
        return event if event is not None else torch.cpu.Event()

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def _apply():
    default = CpuStream()
    cuda: Any = torch.cuda  # given CPU stand-ins; torch types its attributes as the CUDA ones
    cuda.Stream = CpuStream
    cuda.Event = torch.cpu.Event
    cuda.current_stream = lambda device=None: default
    cuda.default_stream = lambda device=None: default
    cuda.stream = torch.cpu.stream
    cuda.set_stream = lambda stream: None


PATCH = Patch(
    name="cpu_streams",
    when="cpu",
    summary="torch.cuda.Stream/Event/current_stream become synchronous CPU stand-ins",
    why="MoEAlltoAllTokenDispatcher builds torch.cuda.Stream() for its D2H copies",
    targets=[Target("megatron.core.transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher",
                    ("num_local_experts", "local_expert_indices", "config"))],
    apply=_apply,
)
