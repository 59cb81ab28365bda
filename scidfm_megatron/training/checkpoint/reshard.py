"""Optimizer state across EP=1 <-> EP>1: megatron-core chains a separate optimizer for the experts only when
EP > 1, so a full resume across that boundary finds the state tensors by parameter key and rebuilds the rest
in this run's chain structure (docs/training.md, "Optimizer state keyed by parameter")."""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import CheckpointMismatch


def _optimizer_metadata(by_param: bool = True, fmt: str = "fully_reshardable") -> dict:
    """megatron's optimizer checkpoint options. ``chained_optim_avoid_prefix``: every optimizer state tensor
    is keyed by its parameter alone (``optimizer.state.exp_avg.decoder.layers...``), not by its position in
    megatron's chain of optimizers (``chained_1.optimizer...``, which exists only with EP>1, where expert
    parameters get their own optimizer). Keyed by parameter, the state of an EP=1 run and of an EP>1 run
    is the same set of tensors, so a full resume can cross EP=1 <-> EP>1 (:func:`across_ep`). Checkpoints
    written before this (``by_param=False``) still load, with EP=1 / EP>1 kept."""
    return {"distrib_optim_sharding_type": fmt, "chained_optim_avoid_prefix": by_param}


def _is_sharded(x) -> bool:
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensorFactory

    return isinstance(x, (ShardedBase, ShardedTensorFactory))


def _saved_steps(x, out: set) -> set:
    """Adam's step counts in a loaded optimizer state (``common_step`` of the plain optimizer, the
    param groups' ``step`` of the distributed one)."""
    if isinstance(x, dict):
        for k, v in x.items():
            if k in ("common_step", "step") and isinstance(v, (int, float, torch.Tensor)) and not _is_sharded(v):
                out.add(float(v))
            else:
                _saved_steps(v, out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _saved_steps(v, out)
    return out


def _rebuild_optimizer_state(template, loaded, step: float):
    """This run's optimizer state dict, shaped as its own optimizer expects it: the tensors loaded by
    parameter key (found at the same places in ``loaded``), everything else (param groups, hyperparameters)
    from this optimizer, with Adam's step set to ``step``. Used when the saving run had the other chain
    structure (EP=1 <-> EP>1)."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    if _is_sharded(template):
        return loaded
    if isinstance(template, LocalNonpersistentObject):
        return template.unwrap()
    if isinstance(template, dict):
        out = {}
        for k, v in template.items():
            sub = loaded.get(k) if isinstance(loaded, dict) else None
            if k in ("common_step", "step") and not _is_sharded(v) and isinstance(v, (int, float, torch.Tensor)):
                out[k] = torch.tensor(step, dtype=v.dtype, device=v.device) if isinstance(v, torch.Tensor) \
                    else type(v)(step)
            else:
                out[k] = _rebuild_optimizer_state(v, sub, step)
        return out
    if isinstance(template, (list, tuple)):
        subs = loaded if isinstance(loaded, (list, tuple)) and len(loaded) == len(template) else [None] * len(template)
        return type(template)(_rebuild_optimizer_state(v, sv, step) for v, sv in zip(template, subs, strict=True))
    return template


def _ensure_common_step(x, step: float) -> None:
    """megatron's plain optimizer stores Adam's step once, as ``state.common_step``, and writes it only when
    the state has a step: a state dict freshly made for loading has none, so add it."""
    if isinstance(x, dict):
        if isinstance(x.get("state"), dict) and isinstance(x.get("param_groups"), list) \
                and "common_step" not in x["state"] and not any("step" in g for g in x["param_groups"]):
            x["state"]["common_step"] = torch.tensor(step)
        for v in x.values():
            _ensure_common_step(v, step)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _ensure_common_step(v, step)


def across_ep(loaded, optimizer, model_sd: dict, path: str | Path):
    """The optimizer state dict ``loaded`` (saved with the other chain structure, keyed by parameter) in the
    shape this run's ``optimizer`` loads: the state tensors found by key, the rest rebuilt from this
    optimizer with the checkpoint's one common Adam step."""
    steps = _saved_steps(loaded, set())
    if len(steps) != 1:
        raise CheckpointMismatch(f"{path}: optimizer step counts {sorted(steps)}; expected one common step")
    template = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_optimizer_metadata(True))
    step = steps.pop()
    out = _rebuild_optimizer_state(template, loaded, step)
    _ensure_common_step(out, step)
    return out
