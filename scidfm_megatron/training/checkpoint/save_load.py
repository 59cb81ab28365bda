"""Save and load: atomic saves (``iter_N.tmp`` renamed when every rank finished), synchronous or
asynchronous, in either optimizer format, and loads at any layout (docs/training.md, "Checkpoints")."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from ...errors import CheckpointMismatch
from ...utils import atomic_write
from .directory import complete_checkpoints, iter_dir, log, read_meta
from .integrity import check_files, check_model_shapes
from .reshard import _optimizer_metadata, across_ep


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


def _sharded_state(chunks, optimizer, scheduler, with_optimizer: bool, common: dict, is_loading: bool = False,
                   by_param: bool = True, fmt: str = "fully_reshardable"):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd = _model_sharded(chunks)
    state = dict(model_sd)
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading,
            metadata=_optimizer_metadata(by_param and fmt == "fully_reshardable", fmt))
        state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        state["rng_state"] = ShardedObject("rng_state", rng_state(), (world,), (rank,), replica_id=0)
    state["common"] = common
    return state


def _model_sharded(chunks) -> dict:
    # The chunks' dicts stay nested (model0, model1, ...): with the interleaved pipeline their local keys
    # collide (every chunk has its own "decoder.layers.0..."), and megatron maps optimizer state to
    # parameters by walking the nested values, not by key.
    return {f"model{i}" if len(chunks) > 1 else "model": c.module.sharded_state_dict() if hasattr(c, "module")
            else c.sharded_state_dict() for i, c in enumerate(chunks)}


FORMATS = ("fully_reshardable", "dp_reshardable")


def _save_strategy():
    """torch_dist, written in parallel by the DP replicas (megatron's fully-parallel wrapper: each replica
    writes a share of the replicated tensors instead of DP rank 0 writing them all)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    strategy = get_default_save_sharded_strategy()
    group = ps.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelSaveStrategyWrapper(strategy, group) if group.size() > 1 else strategy


def save(root: str | Path, iteration: int, chunks, optimizer, scheduler, common: dict, keep_last: int = 2,
         with_optimizer: bool = True, optimizer_format: str = "fully_reshardable", async_queue=None,
         files: Optional[dict] = None, keep_every: Optional[int] = None,
         inject_error: Optional[OSError] = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory (with ``async_queue``, the
    directory it will have once the queue finalizes the save).

    ``optimizer_format`` (the distributed optimizer's layout on disk; the plain optimizer is the same in
    both): ``fully_reshardable`` gathers each DP group's optimizer shards into per-parameter tensors, so
    the checkpoint loads at any layout, EP=1 <-> EP>1 included; ``dp_reshardable`` writes every rank's
    buffers as they are, with no gather (the fast periodic save), loadable at the same TP/PP/EP.
    ``async_queue`` (megatron's ``AsyncCallsQueue``): the tensors are staged and written by a forked
    process while training goes on; the checkpoint is renamed into place and ``latest`` moved only when
    every rank's write has finished (the queue's finalize step), so a process killed mid-write leaves an
    ``iter_N.tmp`` that resume ignores. ``files`` ({name: source path}): copied into the checkpoint
    directory before it is published (the run's tokenizer). ``with_optimizer=False`` writes model weights
    only (checkpoint conversion): marked ``weights_only``, a run resuming from it starts a fresh optimizer
    and schedule.

    A save that fails (an OSError on any rank: the free-space check against the previous checkpoint's
    size, or the write) raises :class:`~.faults.SaveFailed` on every rank after removing ``iter_N.tmp``;
    the previous checkpoint and ``latest`` are untouched (synchronous saves; ``inject_error``: the fault
    drill's error, raised on this rank after the write). ``keep_every``: every K-th iteration's checkpoint
    is kept besides the last ``keep_last``."""
    from megatron.core import dist_checkpointing

    from ...quiet import quiet_checkpoint_warnings
    from ..write_queue import orphan_safe_write_queue

    quiet_checkpoint_warnings()
    orphan_safe_write_queue()  # megatron's write-result queue, dying with its rank and never importing torch
    if optimizer_format not in FORMATS:
        raise ValueError(f"checkpoint format must be one of {FORMATS}, got {optimizer_format!r}")
    if async_queue is not None:
        async_queue.maybe_finalize_async_calls(blocking=True)  # one save in flight at a time
    root = Path(root)
    final = iter_dir(root, iteration)
    tmp = Path(f"{final}.tmp")
    rank = torch.distributed.get_rank()
    err = _free_space_error(root, chunks, with_optimizer) if rank == 0 else None
    _agree_or_fail(err, root, tmp, iteration)  # nothing written yet
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    torch.distributed.barrier()
    common = dict(common, iteration=iteration, layout=_layout_tag(), weights_only=not with_optimizer,
                  optimizer_format=optimizer_format,
                  optimizer_keys="by_param" if optimizer_format == "fully_reshardable" else "chained")
    state = _sharded_state(chunks, optimizer, scheduler, with_optimizer, common, fmt=optimizer_format)

    def publish():
        torch.distributed.barrier()
        if rank == 0:
            for name, src in (files or {}).items():
                shutil.copyfile(src, tmp / name)
            atomic_write(tmp / "scidfm_meta.json", json.dumps({k: v for k, v in common.items() if k != "rng"},
                                                              indent=1, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write(root / "latest", str(iteration))
            for it, old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
                if not (keep_every and it % keep_every == 0):
                    shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()

    if async_queue is None:
        err = None
        try:
            dist_checkpointing.save(state, str(tmp), sharded_strategy=_save_strategy())
            if inject_error is not None:
                raise inject_error
        except OSError as exc:  # (an error inside megatron's collective write ends every rank's save)
            err = exc
        _agree_or_fail(err, root, tmp, iteration)
        publish()
    else:
        request = dist_checkpointing.save(state, str(tmp), sharded_strategy=_save_strategy(),
                                          async_sharded_save=True)
        hold = os.environ.get("SCIDFM_TEST_HOLD_ASYNC_WRITE")
        if hold and int(hold) == iteration:
            request = _write_then_hold(request, tmp / f"written.rank{rank}")
        request.add_finalize_fn(publish)
        async_queue.schedule_async_request(request)
    return final


def _write_then_hold(request, marker: Path):
    """A fault point for tests (``SCIDFM_TEST_HOLD_ASYNC_WRITE=N``): the asynchronous write of iteration N
    writes every byte, marks ``marker`` and then never returns, so the save is never finalized (renamed,
    `latest` moved) and a test can kill the job at that exact point instead of racing the write."""
    write = request.async_fn

    def write_then_hold(*args, **kwargs):
        import time

        write(*args, **kwargs)
        marker.touch()
        while True:
            time.sleep(60)
    return request._replace(async_fn=write_then_hold)


def _free_space_error(root: Path, chunks, with_optimizer: bool) -> Optional[OSError]:
    """Rank 0: ENOSPC if the save directory's file system has less room than the previous checkpoint
    took (or, for the first save, this rank's parameters x 16 bytes x the world size / DP: a rough upper
    bound on weights + fp32 master + two Adam moments)."""
    from ..faults import dir_size, disk_free_check

    done = complete_checkpoints(root)
    if done:
        expected = dir_size(done[-1][1])
    else:
        from megatron.core import parallel_state as ps

        numel = sum(p.numel() for c in chunks for p in c.parameters())
        expected = numel * (16 if with_optimizer else 4) * torch.distributed.get_world_size() // max(
            ps.get_data_parallel_world_size(), 1)
    return disk_free_check(root, expected)


def _agree_or_fail(err: Optional[OSError], root: Path, tmp: Path, iteration: int) -> None:
    """Collective: if any rank has an error, every rank raises SaveFailed naming the first failing rank's
    path and errno, after rank 0 removed the temporary directory (the previous checkpoint and `latest`
    are never touched before the publish step)."""
    from ...device import comm_device
    from ..faults import SaveFailed

    flag = torch.tensor([0 if err is None else 1], dtype=torch.int32, device=comm_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if not flag.item():
        return
    errs: list[Optional[tuple]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errs, None if err is None else (err.errno, err.strerror, err.filename))
    rank, (no, text, name) = next((r, e) for r, e in enumerate(errs) if e is not None)
    if torch.distributed.get_rank() == 0 and tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    torch.distributed.barrier()
    latest = root / "latest"
    kept = latest.read_text().strip() if latest.exists() else None
    raise SaveFailed(no, f"{text} on rank {rank} ({name or tmp}); removed {tmp.name}; "
                         f"kept {'latest=' + kept if kept else 'no earlier checkpoint'}",
                    str(iter_dir(root, iteration)))


def _load_strategy(path):
    """torch_dist, read in parallel by the DP replicas (each reads a share and they exchange), as
    megatron's fully-parallel load wrapper does."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    strategy = get_default_load_sharded_strategy(str(path))
    group = ps.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelLoadStrategyWrapper(strategy, group) if group.size() > 1 else strategy


def _materialize_optimizer_state(optimizer) -> None:
    """A distributed optimizer over torch's Adam has no state before its first step, and megatron's
    DistributedOptimizer.state_dict() needs it (its 'step'). Megatron-core's own remedy, a step with zero
    gradients, creates it; the load below overwrites every value it touched (params and moments)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not any(len(s) for s in opt.optimizer.state.values()):
            opt._init_optimizer_states_with_dummy_values()


def load(path: str | Path, chunks, optimizer=None, scheduler=None, weights_only: bool = False) -> dict:
    """Load into this rank's shards (any layout). Returns the common state (iteration, consumed samples...)."""
    from megatron.core import dist_checkpointing

    from ...quiet import quiet_checkpoint_warnings

    quiet_checkpoint_warnings()
    path = Path(path)
    check_files(path)
    check_model_shapes(path, chunks)
    meta = read_meta(path)
    if meta.get("weights_only") and not weights_only:
        raise CheckpointMismatch(f"{path} holds model weights only (no optimizer state); start from it with "
                                 f"checkpoint.init_from={path.parent}")
    here, saved_layout = _layout_tag(), meta.get("layout") or {}
    same_layout = saved_layout == here
    saved_ep = saved_layout.get("ep", here["ep"])
    by_param = meta.get("optimizer_keys") == "by_param"
    fmt = meta.get("optimizer_format", "fully_reshardable")
    cross_ep = not weights_only and (saved_ep > 1) != (here["ep"] > 1)
    if (not weights_only and fmt != "fully_reshardable"
            and any(saved_layout.get(k) != here[k] for k in ("tp", "pp", "ep"))):
        raise CheckpointMismatch(
            f"{path} holds the distributed optimizer in the {fmt} format (each rank's buffers as they were, the "
            f"fast periodic save), loadable at the same TP/PP/EP only: it was saved at {saved_layout}, this run is "
            f"{here}. Resume at that layout (then the run's final save, or checkpoint.format: fully_reshardable, is "
            f"layout-free), or start from its weights with checkpoint.init_from={path}.")
    if cross_ep and not by_param:
        # Checkpoints written before optimizer state was keyed by parameter: with EP>1 megatron-core keyed
        # the state by its position in a chain of optimizers (dense, expert), which EP=1 does not have.
        raise CheckpointMismatch(
            f"{path} was saved with EP={saved_ep} by an older version (optimizer state keyed by megatron's chained "
            f"optimizer position) and this run has EP={here['ep']}: a full resume of that checkpoint must keep EP>1 "
            f"(any TP/PP/DP/EP>1 change is fine). To continue with a fresh optimizer, set "
            f"checkpoint.init_from={path} and a new checkpoint.save.")
    if not weights_only:
        _materialize_optimizer_state(optimizer)
    state = _sharded_state(chunks, optimizer, scheduler, not weights_only, {}, is_loading=True, by_param=by_param,
                           fmt=fmt)
    if weights_only or not same_layout:
        state.pop("rng_state", None)
    loaded = dist_checkpointing.load(state, str(path), sharded_strategy=_load_strategy(path))
    if cross_ep:
        # EP=1 <-> EP>1: one optimizer on one side, megatron's chain of two (dense, expert) on the other. The
        # state tensors were found by parameter key; the rest is rebuilt in this run's structure.
        loaded["optimizer"] = across_ep(loaded["optimizer"], optimizer, _model_sharded(chunks), path)
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
