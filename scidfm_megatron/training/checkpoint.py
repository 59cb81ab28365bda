"""Checkpoints with megatron-core's dist_checkpointing: atomic, resumable, reshardable.

Layout of ``checkpoint.save``::

    iter_0000050/          complete checkpoint (dist_checkpointing torch_dist format + common.pt)
    iter_0000100/
    iter_0000150.tmp/      a save in progress, or one that was interrupted (ignored, with a warning)
    latest                 text file: the newest complete iteration; written last, atomically

A save goes into ``iter_N.tmp``; only after every rank finished does rank 0 rename it to ``iter_N`` and
then move ``latest``. Resume takes the newest complete ``iter_*`` (so a crash between the rename and the
marker loses nothing), warns about ``*.tmp`` leftovers and removes them. Model and optimizer state are
sharded tensors, so a checkpoint saved at one TP/PP/EP/DP layout loads at another; the scheduler,
iteration, consumed samples and the run's model config are common state; per-rank RNG states are
restored only when the layout is unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..utils import atomic_write

log = logging.getLogger("scidfm.checkpoint")
_ITER = re.compile(r"^iter_(\d{7})$")


class CheckpointMismatch(RuntimeError):
    pass


def iter_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _ITER.match(p.name)
        if m and p.is_dir() and (p / "metadata.json").exists() and (p / "scidfm_meta.json").exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_resume(root: str | Path, cleanup: bool = True) -> Optional[Path]:
    """The newest complete checkpoint under ``root``; interrupted saves are reported (and removed)."""
    root = Path(root)
    if not root.is_dir():
        return None
    for p in sorted(root.glob("iter_*.tmp")):
        log.warning("ignoring interrupted checkpoint save %s (it never completed)%s", p,
                    "; removing it" if cleanup else "")
        if cleanup:
            shutil.rmtree(p, ignore_errors=True)
    done = complete_checkpoints(root)
    latest = root / "latest"
    if latest.exists() and done:
        marked = int(latest.read_text().strip() or -1)
        if marked != done[-1][0]:
            log.warning("%s says iteration %s but iter_%07d is complete and newer; using it", latest, marked, done[-1][0])
    return done[-1][1] if done else None


def resolve(path: str | Path, key: str) -> Path:
    """A checkpoint directory, or a save directory (its newest complete checkpoint); fails naming ``key``."""
    from ..config import ConfigError

    src = Path(path)
    found = src if (src / "metadata.json").exists() else find_resume(src, cleanup=False)
    if found is None:
        raise ConfigError(f"{key} {src}: no complete checkpoint there")
    return found


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout_tag() -> dict:
    from megatron.core import parallel_state as ps

    return dict(world=torch.distributed.get_world_size(), tp=ps.get_tensor_model_parallel_world_size(),
                pp=ps.get_pipeline_model_parallel_world_size(), ep=ps.get_expert_model_parallel_world_size())


def _sharded_state(chunks, optimizer, scheduler, with_optimizer: bool, common: dict, is_loading: bool = False):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd = {}
    for i, c in enumerate(chunks):
        model_sd[f"model{i}" if len(chunks) > 1 else "model"] = c.module.sharded_state_dict() \
            if hasattr(c, "module") else c.sharded_state_dict()
    state = dict(model_sd)
    if with_optimizer:
        # The chunks' dicts stay nested (model0, model1, ...): with the interleaved pipeline their local keys
        # collide (every chunk has its own "decoder.layers.0..."), and megatron maps optimizer state to
        # parameters by walking the nested values, not by key.
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        state["rng_state"] = ShardedObject("rng_state", rng_state(), (world,), (rank,), replica_id=0)
    state["common"] = common
    return state


def save(root: str | Path, iteration: int, chunks, optimizer, scheduler, common: dict, keep_last: int = 2,
         with_optimizer: bool = True) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    ``with_optimizer=False`` writes model weights only (checkpoint conversion): such a checkpoint is
    marked ``weights_only`` and a run resuming from it starts a fresh optimizer and schedule."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = iter_dir(root, iteration)
    tmp = Path(f"{final}.tmp")
    rank = torch.distributed.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    torch.distributed.barrier()
    common = dict(common, iteration=iteration, layout=_layout_tag(), weights_only=not with_optimizer)
    dist_checkpointing.save(_sharded_state(chunks, optimizer, scheduler, with_optimizer, common), str(tmp))
    torch.distributed.barrier()
    if rank == 0:
        (tmp / "scidfm_meta.json").write_text(json.dumps({k: v for k, v in common.items() if k != "rng"},
                                                          indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write(root / "latest", str(iteration))
        for _, old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return final


def check_model_shapes(path: str | Path, chunks) -> None:
    """Fail with the tensor name if the checkpoint's tensors disagree with this model's global shapes."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(str(path))
    problems = []
    for c in chunks:
        m = c.module if hasattr(c, "module") else c
        for name, st in m.sharded_state_dict().items():
            if not isinstance(st, ShardedTensor):
                continue  # SwiGLU factories are checked through the sharded load itself
            key = st.key
            if key not in saved:
                problems.append(f"{key}: not in the checkpoint")
            elif tuple(saved[key].global_shape) != tuple(st.global_shape):
                problems.append(f"{key}: checkpoint has shape {tuple(saved[key].global_shape)}, "
                                f"this model {tuple(st.global_shape)}")
    if problems:
        raise CheckpointMismatch(f"checkpoint {path} does not fit this model ({len(problems)} tensors), e.g. "
                                 + "; ".join(problems[:4]) + ". Check model.* against the run that saved it "
                                 f"({Path(path) / 'scidfm_meta.json'}).")


def _materialize_optimizer_state(optimizer) -> None:
    """A distributed optimizer over torch's Adam has no state before its first step, and megatron's
    DistributedOptimizer.state_dict() needs it (its 'step'). Megatron-core's own remedy, a step with zero
    gradients, creates it; the load below overwrites every value it touched (params and moments)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not any(len(s) for s in opt.optimizer.state.values()):
            opt._init_optimizer_states_with_dummy_values()


def is_weights_only(path: str | Path) -> bool:
    """True for a checkpoint without optimizer state (e.g. converted from Hugging Face)."""
    return bool(json.loads((Path(path) / "scidfm_meta.json").read_text()).get("weights_only"))


def load(path: str | Path, chunks, optimizer=None, scheduler=None, weights_only: bool = False) -> dict:
    """Load into this rank's shards (any layout). Returns the common state (iteration, consumed samples...)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    check_model_shapes(path, chunks)
    meta = json.loads((path / "scidfm_meta.json").read_text())
    if meta.get("weights_only") and not weights_only:
        raise CheckpointMismatch(f"{path} holds model weights only (no optimizer state); start from it with "
                                 f"checkpoint.init_from={path.parent}")
    here = _layout_tag()
    same_layout = meta.get("layout") == here
    saved_ep = (meta.get("layout") or {}).get("ep", here["ep"])
    if not weights_only and (saved_ep > 1) != (here["ep"] > 1):
        # megatron-core keeps expert parameters in a separate (chained) optimizer only when EP>1, so the
        # optimizer state of an EP=1 run and of an EP>1 run are organised differently.
        raise CheckpointMismatch(
            f"{path} was saved with EP={saved_ep} and this run has EP={here['ep']}: megatron-core's optimizer state "
            f"differs between EP=1 and EP>1, so a full resume must keep EP>1 (any TP/PP/DP/EP>1 change is fine). "
            f"To continue anyway with a fresh optimizer, set checkpoint.init_from={path} and a new checkpoint.save.")
    if not weights_only:
        _materialize_optimizer_state(optimizer)
    state = _sharded_state(chunks, optimizer, scheduler, not weights_only, {}, is_loading=True)
    if weights_only or not same_layout:
        state.pop("rng_state", None)
    loaded = dist_checkpointing.load(state, str(path))
    for i, c in enumerate(chunks):
        m = c.module if hasattr(c, "module") else c
        m.load_state_dict(loaded[f"model{i}" if len(chunks) > 1 else "model"], strict=True)
    if weights_only and optimizer is not None:
        # A mixed-precision optimizer (bf16) keeps fp32 master copies of the parameters, made when it was
        # built: from the random initialisation. Weights loaded into the model afterwards must be copied
        # into those masters too, or the first optimizer step writes the random weights back (plain,
        # distributed and chained expert optimizers alike; a no-op for fp32 without masters).
        optimizer.reload_model_params()
    if not weights_only:
        optimizer.load_state_dict(loaded["optimizer"])
        if scheduler is not None and loaded.get("scheduler") is not None:
            scheduler.load_state_dict(loaded["scheduler"])
        if "rng_state" in loaded:
            set_rng_state(loaded["rng_state"])
        elif not same_layout:
            log.warning("checkpoint layout %s differs from this run's %s: RNG states start fresh",
                        meta.get("layout"), _layout_tag())
    return loaded.get("common", meta)
