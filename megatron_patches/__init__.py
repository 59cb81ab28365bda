"""Every change scidfm-megatron makes to megatron-core's behaviour, in one place.

Call :func:`apply` once per process before building a model (``scidfm_megatron`` does it for you).
It is idempotent, refuses a megatron-core it was not written for, and installs:

* ``when="no_te"`` patches whenever TransformerEngine is absent (CPU, or GPUs without TE): upstream bugs
  that only show without TE;
* ``when="cpu"`` patches only when CUDA is absent: the CPU/gloo runtime. On a GPU machine megatron-core
  runs unchanged (apart from ``when="always"`` ones: the lean GPT document index).

No patch changes numerics: the parallel-parity tests compare every layout against a single process.
List them with ``python -m megatron_patches``. Disable one (to reproduce the failure it fixes) with
``SCIDFM_DISABLE_PATCHES=name1,name2``.
"""

from __future__ import annotations

import functools
import os

from . import (
    cpu_device,
    cpu_rng,
    cpu_sharded_tensor_init,
    cpu_streams,
    cpu_tensor_type,
    distopt_torch_adam_load,
    distopt_torch_adam_step,
    gloo_uneven_all_gather,
    gpt_lean_document_index,
    moe_cpu_split_sizes,
    te_general_gemm_missing,
)
from ._base import Patch, Target

SUPPORTED_MEGATRON_CORE = ("0.16.1",)

PATCHES: tuple[Patch, ...] = (
    te_general_gemm_missing.PATCH,
    distopt_torch_adam_load.PATCH,
    distopt_torch_adam_step.PATCH,
    cpu_device.PATCH,
    cpu_rng.PATCH,
    cpu_streams.PATCH,
    cpu_sharded_tensor_init.PATCH,
    cpu_tensor_type.PATCH,
    moe_cpu_split_sizes.PATCH,
    gloo_uneven_all_gather.PATCH,
    gpt_lean_document_index.PATCH,
)

_applied: list[str] = []


class UnsupportedMegatronVersion(RuntimeError):
    pass


def megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def check_version() -> str:
    version = megatron_core_version()
    if version not in SUPPORTED_MEGATRON_CORE:
        raise UnsupportedMegatronVersion(
            f"megatron_patches was written and tested for megatron-core {', '.join(SUPPORTED_MEGATRON_CORE)}, "
            f"but megatron-core {version} is installed. Install the pinned version "
            f"(pip install megatron-core=={SUPPORTED_MEGATRON_CORE[-1]}), or port and re-test the patches "
            f"(python -m pytest tests/test_patches.py) before adding {version} to SUPPORTED_MEGATRON_CORE.")
    return version


def have_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def transformer_engine_import_error():
    """None when TransformerEngine imports; else the exception it raised (ImportError when it is not
    installed; anything else, e.g. an undefined symbol, when a build does not match this torch/CUDA).
    Tried once per process: a failed import is not cached by Python and would be searched for again."""
    try:
        import transformer_engine  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken TE build raises all sorts; the caller reports it
        return exc
    return None


def have_transformer_engine() -> bool:
    return transformer_engine_import_error() is None


def wanted(patch: Patch, cuda: bool, te: bool) -> bool:
    return (patch.when == "always" or (patch.when == "no_te" and not te)
            or (patch.when == "cpu" and not cuda))


def apply() -> list[str]:
    """Install the patches this machine needs; return the names installed (by this or an earlier call)."""
    check_version()
    disabled = {n.strip() for n in os.environ.get("SCIDFM_DISABLE_PATCHES", "").split(",") if n.strip()}
    unknown = disabled - {p.name for p in PATCHES}
    if unknown:
        raise ValueError(f"SCIDFM_DISABLE_PATCHES names unknown patches {sorted(unknown)}; "
                         f"known: {[p.name for p in PATCHES]}")
    cuda, te = have_cuda(), have_transformer_engine() and have_cuda()
    if not cuda:
        # megatron's jit_fuser is torch.compile; on CPU it would compile (slowly) at first use and
        # buys nothing at the tiny sizes CPU runs use.
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    for patch in PATCHES:
        if patch.name in _applied or patch.name in disabled or not wanted(patch, cuda, te):
            continue
        patch.apply()
        _applied.append(patch.name)
    return list(_applied)


def applied() -> list[str]:
    return list(_applied)


__all__ = ["PATCHES", "Patch", "Target", "apply", "applied", "check_version", "SUPPORTED_MEGATRON_CORE",
           "UnsupportedMegatronVersion"]
