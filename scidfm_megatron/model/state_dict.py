"""Unsharded ("global") state dict <-> this rank's shard of the model, for any TP/PP/EP/DP layout.

The global state dict is what a single-process model of the same config returns from ``state_dict()``
(minus ``_extra_state``): per-layer, per-expert names such as
``decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight`` with full (unsharded) shapes; the
embedding and output layer keep the padded vocabulary. Checkpoint conversion and the parity tests build
on these two functions.

No sharding rule is re-implemented here: megatron-core's own ``sharded_state_dict()`` describes where
every local tensor sits in the global one (``ShardedTensor.global_offset``, including the SwiGLU
``[w1; w3]`` split that TP applies to ``linear_fc1``). Its keys are the same for the local and the
TransformerEngine specs (that is what makes megatron checkpoints portable between them) and stack layers
and experts along prepended axes; :func:`canonical_name` turns key + prepended offsets into the per-layer,
per-expert name above, so one global state dict serves both specs and every layout.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

# megatron dist-checkpoint key suffix (after "decoder.layers.") -> local-spec module path.
_LAYER_RENAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_EXPERTS = "mlp.experts.experts."


@dataclass
class Piece:
    """One local tensor (or SwiGLU half) and where it sits in a global tensor."""

    name: str  # global state-dict name
    global_shape: tuple[int, ...]
    index: tuple[slice, ...]  # slices into the global tensor
    tensor: torch.Tensor  # view into the local parameter (or a clone, when gathering other tensors)
    main_replica: bool


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def canonical_name(key: str, prepend_offsets: tuple[int, ...]) -> str:
    """megatron sharded key + offsets along its prepended (layer, expert) axes -> global name.

    >>> canonical_name("decoder.layers.mlp.experts.experts.linear_fc1.weight", (3, 5))
    'decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight'
    """
    expected = 0
    name = key
    if key.startswith("decoder.layers."):
        rest = _LAYER_RENAMES.get(key[len("decoder.layers."):], key[len("decoder.layers."):])
        expected = 1
        if rest.startswith(_EXPERTS):
            expected = 2
            rest = f"mlp.experts.local_experts.{prepend_offsets[1] if len(prepend_offsets) > 1 else '?'}." \
                   + rest[len(_EXPERTS):]
        name = f"decoder.layers.{prepend_offsets[0] if prepend_offsets else '?'}.{rest}"
    if len(prepend_offsets) != expected:
        raise RuntimeError(f"cannot name megatron sharded tensor {key!r}: {len(prepend_offsets)} prepended "
                           f"axes, expected {expected} (layer{', expert' if expected == 2 else ''})")
    return name


def _pieces(module) -> Iterator[Piece]:
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
        is_main_replica,
    )

    for local_name, obj in module.sharded_state_dict().items():
        if isinstance(obj, ShardedObject) or local_name.endswith("_extra_state"):
            continue
        shards = [obj]
        if isinstance(obj, ShardedTensorFactory):
            built = obj.build()
            shards = list(built.values()) if isinstance(built, dict) else list(built)
        for st in shards:
            if not isinstance(st, ShardedTensor):
                raise RuntimeError(f"unexpected sharded object {type(st).__name__} for {local_name}")
            if st.flattened_range is not None:
                raise RuntimeError(f"{local_name}: flattened (distributed-optimizer) shards are not model weights")
            p = st.prepend_axis_num
            yield Piece(
                name=canonical_name(st.key, tuple(st.global_offset[:p])),
                global_shape=tuple(st.global_shape[p:]),
                index=tuple(slice(o, o + s) for o, s in zip(st.global_offset[p:], st.local_shape, strict=False)),
                tensor=st.data,
                main_replica=is_main_replica(st.replica_id),
            )


@contextlib.contextmanager
def _params_replaced_by(module, tensor_of: Callable[[torch.nn.Parameter], Optional[torch.Tensor]]):
    """Temporarily point every parameter's data at ``tensor_of(param)`` (e.g. its gradient)."""
    saved = []
    try:
        for prm in module.parameters():
            t = tensor_of(prm)
            if t is None:
                t = torch.zeros_like(prm)
            saved.append((prm, prm.data))
            prm.data = t.view_as(prm).to(prm.dtype)
        yield
    finally:
        for prm, data in saved:
            prm.data = data


def local_pieces(model, tensor_of: Optional[Callable] = None, main_only: bool = True) -> list[Piece]:
    """This rank's pieces of the global state dict; ``tensor_of(param)`` selects e.g. gradients."""
    module = unwrap(model)
    if tensor_of is None:
        pieces = list(_pieces(module))
    else:
        with _params_replaced_by(module, tensor_of):
            pieces = [Piece(p.name, p.global_shape, p.index, p.tensor.detach().clone(), p.main_replica)
                      for p in _pieces(module)]
    return [p for p in pieces if p.main_replica or not main_only]


def gather_global_state_dict(models, tensor_of: Optional[Callable] = None, dst: Optional[int] = 0,
                             group=None) -> Optional[dict[str, torch.Tensor]]:
    """Assemble the full global state dict from all ranks (weights by default, or ``tensor_of(param)``).

    ``models``: a model or the list of this rank's model chunks. Returns the dict on ``dst`` (every rank
    if ``dst`` is None), None elsewhere. Meant for small models and tests: it materialises everything
    on one rank. Raises if some element of a global tensor was covered by no rank.
    """
    import torch.distributed as dist

    models = models if isinstance(models, (list, tuple)) else [models]
    mine = [(p.name, p.global_shape, p.index, p.tensor.detach().cpu().clone())
            for m in models for p in local_pieces(m, tensor_of)]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        everyone: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, mine, group=group)
    else:
        everyone = [mine]
    if dst is not None and dist.is_initialized() and dist.get_rank() != dst:
        return None
    out: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    for rank_pieces in everyone:
        for name, shape, index, t in rank_pieces:
            if name not in out:
                out[name] = torch.empty(shape, dtype=t.dtype)
                covered[name] = torch.zeros(shape, dtype=torch.bool)
            out[name][index] = t
            covered[name][index] = True
    holes = [n for n, c in covered.items() if not bool(c.all())]
    if holes:
        raise RuntimeError(f"global tensors not fully covered by the ranks' shards: {holes[:5]}")
    return dict(sorted(out.items()))


def load_global_state_dict(models, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy each rank's slice of a global state dict into its model shard(s), in place.

    ``strict``: every global tensor this rank needs must be present with the right shape, and (checked
    per rank) no name in ``state`` may be unknown to the model. Errors name the tensor.
    """
    from megatron.core import parallel_state as ps

    models = models if isinstance(models, (list, tuple)) else [models]
    used: set[str] = set()
    with torch.no_grad():
        for m in models:
            for p in local_pieces(m, main_only=False):
                if p.name not in state:
                    if strict:
                        raise KeyError(f"global state dict has no tensor {p.name!r} (needed by this shard)")
                    continue
                src = state[p.name]
                if tuple(src.shape) != p.global_shape:
                    raise ValueError(f"tensor {p.name!r} has shape {tuple(src.shape)}, the model expects "
                                     f"{p.global_shape}")
                p.tensor.copy_(src[p.index].to(p.tensor.dtype))
                used.add(p.name)
    if strict and ps.get_pipeline_model_parallel_world_size() == 1 \
            and ps.get_expert_model_parallel_world_size() == 1:
        # Only a rank that holds every layer and expert can tell an unknown name from another rank's.
        extra = sorted(set(state) - used)
        if extra:
            raise KeyError(f"global state dict has tensors the model does not: {extra[:5]}")
