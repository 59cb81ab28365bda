"""Checks that a checkpoint is fit to load, before anything is read (files present and long enough, tensor
shapes, the data position), and that a weights-only load reached the optimizer's fp32 masters
(docs/training.md, "Damaged checkpoints" and "Data state")."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ...errors import CheckpointMismatch


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
    from ...device import comm_device

    equal = all(torch.equal(m.detach().to(p.dtype).view(-1), p.detach().view(-1)) for p, m in pairs)
    has = torch.tensor([1 if pairs else 0], dtype=torch.int32, device=comm_device())
    ok = torch.tensor([1 if equal else 0], dtype=torch.int32, device=comm_device())
    torch.distributed.all_reduce(has, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return None if not has.item() else bool(ok.item())
