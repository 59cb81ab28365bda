"""Known, harmless library noise, silenced by name where it arises (the house rule: every line a user sees
means something). Each entry says why it is safe to drop.

* Checkpoint load/save: torch.distributed.checkpoint warns (FutureWarning) that megatron-core's
  dist_checkpointing still uses ShardedTensor and ``load_state_dict``. megatron-core 0.16.1 is pinned;
  the warning is about its internals, not about anything a user can change. Printed by every rank.
* Dataset building: megatron-core logs "Unable to save / Cannot save the ... indexes because path_to_cache
  is None" when ``data.cache_dir`` is null, on every start. Not caching is the recipe's choice (the indexes
  are rebuilt, in seconds at this library's data sizes); docs/training.md says what data.cache_dir does.
"""

from __future__ import annotations

import logging
import warnings

CHECKPOINT_WARNINGS = (r"Please use DTensor instead and we are deprecating ShardedTensor",
                       r"`load_state_dict` is deprecated and will be removed")
DATASET_LOGGERS = ("megatron.core.datasets.blended_dataset", "megatron.core.datasets.gpt_dataset")
NO_CACHE = "because path_to_cache is None"


def quiet_checkpoint_warnings() -> None:
    for message in CHECKPOINT_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


class _NoCacheFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return NO_CACHE not in record.getMessage()


_FILTER = _NoCacheFilter()


def quiet_dataset_cache_lines() -> None:
    for name in DATASET_LOGGERS:
        log = logging.getLogger(name)
        if _FILTER not in log.filters:
            log.addFilter(_FILTER)
