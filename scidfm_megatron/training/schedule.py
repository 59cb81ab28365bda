"""The LR / weight-decay schedule, and what a resume does with it.

A full resume uses the schedule the recipe asks for, from the resume point: Megatron-LM's
``--override-opt-param-scheduler`` semantics. megatron-core's ``OptimizerParamScheduler`` defaults to
the opposite (``use_checkpoint_opt_param_scheduler=True``: the checkpoint's peak LR, minimum LR,
warm-up and decay length come back and the recipe's are silently ignored), and its optimizer's
``load_state_dict`` also restores each parameter group's saved ``max_lr`` / ``min_lr``, which the
scheduler reads before its own values. Here only the step count comes from the checkpoint: halving
``train.lr`` on resume halves the LR from the next iteration on, and a longer ``train.train_iters``
continues the cosine to the new end. Every change against the checkpoint's saved schedule is logged,
one line per key (:func:`changes`), at the resume and by ``scidfm-train --check``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

# (megatron's scheduler state key, the recipe key it comes from)
KEYS = (("max_lr", "train.lr"), ("min_lr", "train.min_lr"), ("lr_warmup_steps", "train.warmup_iters"),
        ("lr_decay_steps", "decay length (train.lr_decay_iters, else train.train_iters)"),
        ("lr_decay_style", "train.lr_decay_style"), ("end_wd", "train.weight_decay"))


def recipe_schedule(train, train_iters: int) -> dict:
    """The scheduler's state keys as this recipe sets them (``train``: the TrainConfig)."""
    decay = train.lr_decay_iters or train_iters  # warmup < decay: validate_run
    return dict(max_lr=float(train.lr), min_lr=float(train.min_lr), lr_warmup_steps=int(train.warmup_iters),
                lr_decay_steps=int(decay), lr_decay_style=train.lr_decay_style, start_wd=float(train.weight_decay),
                end_wd=float(train.weight_decay), wd_incr_steps=int(decay), wd_incr_style="constant")


def build_scheduler(optimizer, train, train_iters: int):
    """megatron-core's ``OptimizerParamScheduler`` (warm-up, then cosine / linear / constant to ``min_lr``)
    with the recipe's values winning over a checkpoint's (``override_opt_param_scheduler``)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    s = recipe_schedule(train, train_iters)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if train.warmup_iters else train.lr, max_lr=s["max_lr"], min_lr=s["min_lr"],
        lr_warmup_steps=s["lr_warmup_steps"], lr_decay_steps=s["lr_decay_steps"],
        lr_decay_style=s["lr_decay_style"], start_wd=s["start_wd"], end_wd=s["end_wd"],
        wd_incr_steps=s["wd_incr_steps"], wd_incr_style=s["wd_incr_style"],
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


def group_lrs(optimizer) -> list[tuple]:
    """Each parameter group's own ``max_lr`` / ``min_lr`` (megatron's scheduler reads these first)."""
    return [(g.get("max_lr"), g.get("min_lr")) for g in optimizer.param_groups]


def restore_group_lrs(optimizer, scheduler, lrs: list[tuple]) -> None:
    """After a checkpoint's optimizer state was loaded: give the parameter groups back this run's
    ``max_lr`` / ``min_lr`` (the load restored the saved ones) and set every group's LR and weight decay
    for the current step from the recipe's schedule."""
    groups = optimizer.param_groups
    if len(groups) != len(lrs):
        raise RuntimeError(f"optimizer has {len(groups)} parameter groups after the load, {len(lrs)} before")
    for g, (hi, lo) in zip(groups, lrs, strict=True):
        if hi is not None:
            g["max_lr"] = hi
        if lo is not None:
            g["min_lr"] = lo
    scheduler.step(increment=0)


def saved_schedule(path: str | Path) -> Optional[dict]:
    """The scheduler state a full checkpoint holds (its ``common.pt``), or None (weights only)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(path))
    return common.get("scheduler") if isinstance(common, dict) else None


def fmt(v) -> str:
    """3.0e-4 for LRs (the shortest exact form), plain for the rest."""
    if isinstance(v, float) and 1e-2 <= abs(v) < 1e4:
        return repr(v)  # weight decay 0.1
    if isinstance(v, float) and v != 0 and not v.is_integer():
        for p in range(1, 17):
            s = f"{v:.{p}e}"
            if float(s) == v:
                break
        return re.sub(r"e([+-])0*(\d)", lambda m: f"e{'-' if m.group(1) == '-' else ''}{m.group(2)}", s)
    if isinstance(v, float) and v.is_integer():
        return f"{v:.1f}"
    return str(v)


def changes(saved: Optional[dict], new: dict) -> list[str]:
    """One line per schedule key whose value differs between a checkpoint and this run, e.g.
    ``train.lr 3.0e-4 -> 1.5e-4``."""
    if not saved:
        return []
    out = []
    for key, name in KEYS:
        old = saved.get(key)
        if old is None or key not in new:
            continue
        a, b = old, new[key]
        same = a == b if isinstance(b, str) else abs(float(a) - float(b)) <= 1e-12 * max(abs(float(b)), 1e-30)
        if not same:
            out.append(f"{name} {fmt(type(b)(a) if not isinstance(b, str) else a)} -> {fmt(b)}")
    return out


def describe_changes(path: str | Path, lines: list[str], iteration: Optional[int] = None) -> str:
    """The log text for a resume whose recipe changes the checkpoint's schedule (one line per key)."""
    at = f" from iteration {iteration + 1}" if iteration is not None else ""
    head = f"[scidfm] the recipe's LR schedule replaces the one saved in {path}{at} (resume point kept):"
    return "\n".join([head] + [f"[scidfm]   {line}" for line in lines])


def resume_point(cfg) -> Optional[Path]:
    """The checkpoint a launch of ``cfg`` would fully resume from (None: a fresh start or weights only);
    the same choice as ``Trainer._restore``, without removing anything."""
    from . import checkpoint as ckpt

    c = cfg.checkpoint
    found = ckpt.find_resume(c.save, cleanup=False) if c.save else None
    if found is None and c.resume_from:
        found = ckpt.resolve(c.resume_from, "checkpoint.resume_from")
    if found is None or ckpt.is_weights_only(found):
        return None
    return found


def check_report(cfg) -> Optional[str]:
    """For ``--check``: the schedule changes the next launch will apply on its resume, or None."""
    from .config import train_iters_of

    path = resume_point(cfg)
    if path is None:
        return None
    try:
        saved = saved_schedule(path)
    except Exception as exc:  # noqa: BLE001  a damaged checkpoint: the run itself names the file (checkpoint.check_files)
        return f"[scidfm] resumes from {path}, whose schedule cannot be read ({type(exc).__name__}: {exc})"
    lines = changes(saved, recipe_schedule(cfg.train, train_iters_of(cfg)))
    from .checkpoint import read_meta

    iteration = int(read_meta(path).get("iteration", 0))
    if not lines:
        return f"[scidfm] resumes from {path} (iteration {iteration}) with its LR schedule unchanged"
    return describe_changes(path, lines, iteration)
