"""The pretraining datasets of a run, and ``scidfm-prepare-data``: build their indices before the GPU job.

    scidfm-prepare-data --config examples/recipes/scidfm18b_stage1.yaml [a.b=value ...] [--epochs 1,2]

On CPU, without torchrun or a process group: reads the recipe exactly as ``scidfm-train`` does, and
builds every GPT and blended dataset index the run will open (train and validation splits of every
mixture source, the blends) into ``data.cache_dir``. The trainer then finds them all and builds none:
it logs ``dataset indices: 0 built, N loaded from DIR``. ``--epochs 1,2`` also builds the other epoch(s)
of the mixture (stage 2's re-sampled sources, its own shuffle) with the same recipe otherwise; a stage-2
recipe with its own schedule is prepared with its own ``--config``.
"""

from __future__ import annotations

import os
from typing import Optional

from ..config import ConfigError


def pretrain_samples(cfg) -> tuple[int, int, int]:
    """(train, validation, test) samples the trainer asks of the blend (test: none)."""
    t = cfg.train
    n_eval = (t.train_iters // t.eval_interval + 1) * t.eval_iters * t.global_batch_size if t.eval_interval else 0
    return t.train_iters * t.global_batch_size, n_eval, 0


def default_threads() -> int:
    """Sources indexed in parallel (megatron's num_dataset_builder_threads): one per core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def run_cache_dir(cfg) -> Optional[str]:
    """``data.cache_dir``, else ``<checkpoint.save>/data_cache``, else None (a temporary directory)."""
    if cfg.data.cache_dir:
        return str(cfg.data.cache_dir)
    if cfg.checkpoint.save:
        return os.path.join(str(cfg.checkpoint.save), "data_cache")
    return None


def check_pretrain(cfg) -> None:
    """Refuse, naming the key, a recipe with no mixture indices to build (SFT, no mixture, no train_iters)."""
    if cfg.train.stage != "pretrain":
        raise ConfigError(f"train.stage is {cfg.train.stage!r}: only pretraining recipes have mixture indices to "
                          f"prepare (SFT data needs none)")
    if not cfg.data.mixture:
        raise ConfigError("data.mixture is required for train.stage: pretrain")
    if not cfg.train.train_iters:
        raise ConfigError("train.train_iters is required for pretraining")


def build_run_datasets(cfg, tokenizer, *, epoch: Optional[int] = None, threads: Optional[int] = None,
                       cache_dir: Optional[str] = None):
    """(train, valid, test) of a pretraining run config, as the trainer builds them. Under a process group
    with no cache directory configured, rank 0 makes a temporary one and shares its path."""
    from .datasets import build_pretrain_datasets
    from .mixture import Mixture

    check_pretrain(cfg)
    t = cfg.train
    mix = Mixture.load(cfg.data.mixture, data_root=cfg.data.data_root)
    cache_dir = cache_dir or run_cache_dir(cfg)
    import torch.distributed as dist

    if cache_dir is None and dist.is_initialized() and dist.get_world_size() > 1:
        from .index_cache import temporary_cache_dir

        box = [temporary_cache_dir() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        cache_dir = box[0]
    return build_pretrain_datasets(mix, cfg.data.epoch if epoch is None else epoch, tokenizer,
                                   seq_length=t.seq_length, samples=pretrain_samples(cfg), seed=t.seed,
                                   split=cfg.data.split, cache_dir=cache_dir,
                                   threads=default_threads() if threads is None else threads)
