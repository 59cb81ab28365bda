"""cpu_rng: megatron-core's CUDA RNG tracker keeps its states on the CPU generator when CUDA is absent.

``tensor_parallel.model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker.add/fork`` read and write
the CUDA default generator (``torch.cuda.get_rng_state``, ``torch.cuda.manual_seed``,
``torch.cuda.default_generators``). On a CPU-only build the "device" generator *is* the CPU generator,
so the patch points megatron's two accessors (``_get_cuda_rng_state``/``_set_cuda_rng_state``) and
``torch.cuda.{get_rng_state,set_rng_state,manual_seed}`` at it. The tracker logic itself
(per-TP-rank seeds, forks for dropout and weight init) is megatron's, unchanged. ``fork()`` warns that
"CPU RNG state changed within GPU RNG context", which on CPU is by construction; that one message is
filtered.
"""

import logging
from typing import Any

import torch

from ._base import Patch, Target

MODULE = "megatron.core.tensor_parallel.random"


class _DropForkWarning(logging.Filter):
    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _apply():
    import megatron.core.tensor_parallel.random as rnd

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    rnd._get_cuda_rng_state = get_state
    rnd._set_cuda_rng_state = set_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # The CPU generator itself: torch.manual_seed would recurse through torch.cuda.manual_seed_all.
    cuda: Any = torch.cuda  # torch types manual_seed as returning None; the stand-in returns the generator
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    logging.getLogger(MODULE).addFilter(_DropForkWarning())


PATCH = Patch(
    name="cpu_rng",
    when="cpu",
    summary="megatron's CUDA RNG tracker uses the CPU generator",
    why="model_parallel_cuda_manual_seed -> 'Torch not compiled with CUDA enabled'",
    targets=[Target(MODULE, "_get_cuda_rng_state", ("device", "clone", "graph_safe")),
             Target(MODULE, "_set_cuda_rng_state", ("new_state", "device", "graph_safe")),
             Target(MODULE, "CudaRNGStatesTracker.add", ("name", "seed")),
             Target(MODULE, "CudaRNGStatesTracker.fork", ("name",)),
             Target(MODULE, "model_parallel_cuda_manual_seed", ("seed",))],
    apply=_apply,
)
