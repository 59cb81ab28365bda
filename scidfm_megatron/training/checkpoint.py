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

from ..errors import CheckpointMismatch  # re-export: defined in scidfm_megatron/errors.py
from ..utils import atomic_write

log = logging.getLogger("scidfm.checkpoint")
_ITER = re.compile(r"^iter_(\d{7})$")


TOKENIZER_FILE = "tokenizer.model"  # the run's tokenizer, copied into every checkpoint it saves


def tokenizer_file(path: str | Path, meta: Optional[dict] = None) -> Optional[Path]:
    """The tokenizer a checkpoint keeps (its copy inside the checkpoint directory), else None."""
    meta = read_meta(path) if meta is None else meta
    rec = meta.get("tokenizer")
    if isinstance(rec, dict) and rec.get("file") and (Path(path) / rec["file"]).is_file():
        return Path(path) / rec["file"]
    return None


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
            log.warning("%s says iteration %s but iter_%07d is complete and newer; using it",
                        latest, marked, done[-1][0])
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


def _optimizer_metadata(by_param: bool = True, fmt: str = "fully_reshardable") -> dict:
    """megatron's optimizer checkpoint options. ``chained_optim_avoid_prefix``: every optimizer state tensor
    is keyed by its parameter alone (``optimizer.state.exp_avg.decoder.layers...``), not by its position in
    megatron's chain of optimizers (``chained_1.optimizer...``, which exists only with EP>1, where expert
    parameters get their own optimizer). Keyed by parameter, the state of an EP=1 run and of an EP>1 run
    is the same set of tensors, so a full resume can cross EP=1 <-> EP>1 (:func:`load`). Checkpoints
    written before this (``by_param=False``) still load, with EP=1 / EP>1 kept."""
    return {"distrib_optim_sharding_type": fmt, "chained_optim_avoid_prefix": by_param}


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

    from ..quiet import quiet_checkpoint_warnings

    quiet_checkpoint_warnings()
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
    from .faults import dir_size, disk_free_check

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
    from ..device import comm_device
    from .faults import SaveFailed

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


def check_data_position(saved_config: Optional[dict], train, path: str | Path) -> None:
    """A full resume continues at the saved sample position; it is exact only when a sample and a step
    mean what they meant when the checkpoint was written. A changed global batch or sequence length is
    refused with the reason (the position is counted in samples of the saved length, the LR schedule in
    iterations of the saved batch, and megatron's dataset index is built for train_iters x global batch)."""
    saved = (saved_config or {}).get("train") or {}
    for key, what in (("global_batch_size", "global batch"), ("seq_length", "sequence length")):
        old, new = saved.get(key), getattr(train, key)
        if old is not None and int(old) != int(new):
            raise CheckpointMismatch(
                f"{path} was written with train.{key}={old} and this run has {new}: a full resume keeps the "
                f"{what} (the data position is in samples of that batch and length, the LR schedule in its "
                f"iterations). Keep train.{key}={old}, or start a new run from these weights with "
                f"checkpoint.init_from={path} (fresh optimizer, schedule and data order) and a new checkpoint.save.")


def check_files(path: str | Path) -> None:
    """Every file the checkpoint's index refers to is there and long enough, before anything is loaded:
    a missing shard or a truncated file (a copy cut short, a full disk) fails here, naming the file,
    instead of deep inside torch.distributed.checkpoint or, worse, after some ranks loaded."""
    path = Path(path)
    for name in ("metadata.json", ".metadata", "common.pt", "scidfm_meta.json"):
        if not (path / name).is_file():
            raise CheckpointMismatch(f"{path / name} is missing: the checkpoint is incomplete; resume from an "
                                     f"earlier one (checkpoint.resume_from=<save dir>/iter_N) or restore the file")
    from torch.distributed.checkpoint import FileSystemReader

    try:
        md = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # noqa: BLE001  any unreadable index is a corrupt checkpoint
        raise CheckpointMismatch(f"{path / '.metadata'} cannot be read ({type(exc).__name__}: {exc}); the "
                                 f"checkpoint is corrupt: resume from an earlier one") from None
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointMismatch(f"{f} is missing (a shard of this checkpoint): restore it, or resume from an "
                                     f"earlier checkpoint (checkpoint.resume_from=<save dir>/iter_N)")
        have = f.stat().st_size
        if have < size:
            raise CheckpointMismatch(f"{f} is truncated ({have} bytes, its index needs {size}): restore it, or "
                                     f"resume from an earlier checkpoint (checkpoint.resume_from=<save dir>/iter_N)")


def check_model_shapes(path: str | Path, chunks) -> None:
    """Fail with the tensor name if the checkpoint's tensors disagree with this model's global shapes."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(str(path))
    problems = []
    for c in chunks:
        m = c.module if hasattr(c, "module") else c
        for _name, st in m.sharded_state_dict().items():
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


def masters_reloaded(optimizer) -> Optional[bool]:
    """Collective. None when the optimizer keeps no fp32 master copies of the weights (fp32 training);
    else True only if on every rank each master equals its model parameter (rounded to the parameter's
    dtype): the check, after a weights-only load, that the masters were reloaded from the loaded weights
    (a bf16 optimizer whose masters kept the random init writes it back at the first step)."""
    pairs: list = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "shard_fp32_from_float16_groups"):  # distributed: this rank's shards
            groups = zip(opt.shard_float16_groups, opt.shard_fp32_from_float16_groups, strict=False)
        elif hasattr(opt, "fp32_from_float16_groups"):
            groups = zip(opt.float16_groups, opt.fp32_from_float16_groups, strict=False)
        else:
            continue
        for model_group, master_group in groups:
            pairs.extend(zip(model_group, master_group, strict=False))
    from ..device import comm_device

    equal = all(torch.equal(m.detach().to(p.dtype).view(-1), p.detach().view(-1)) for p, m in pairs)
    has = torch.tensor([1 if pairs else 0], dtype=torch.int32, device=comm_device())
    ok = torch.tensor([1 if equal else 0], dtype=torch.int32, device=comm_device())
    torch.distributed.all_reduce(has, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return None if not has.item() else bool(ok.item())


def read_meta(path: str | Path) -> dict:
    """A checkpoint's ``scidfm_meta.json``: iteration, layout, formats, weights_only, the run config."""
    return json.loads((Path(path) / "scidfm_meta.json").read_text())


def saved_config(path: str | Path) -> Optional[dict]:
    """The run config a checkpoint was written with (None for converted checkpoints)."""
    return read_meta(path).get("config")


def is_weights_only(path: str | Path) -> bool:
    """True for a checkpoint without optimizer state (e.g. converted from Hugging Face)."""
    return bool(read_meta(path).get("weights_only"))


def load(path: str | Path, chunks, optimizer=None, scheduler=None, weights_only: bool = False) -> dict:
    """Load into this rank's shards (any layout). Returns the common state (iteration, consumed samples...)."""
    from megatron.core import dist_checkpointing

    from ..quiet import quiet_checkpoint_warnings

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
        steps = _saved_steps(loaded["optimizer"], set())
        if len(steps) != 1:
            raise CheckpointMismatch(f"{path}: optimizer step counts {sorted(steps)}; expected one common step")
        template = optimizer.sharded_state_dict(_model_sharded(chunks), is_loading=True,
                                                metadata=_optimizer_metadata(True))
        step = steps.pop()
        loaded["optimizer"] = _rebuild_optimizer_state(template, loaded["optimizer"], step)
        _ensure_common_step(loaded["optimizer"], step)
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
