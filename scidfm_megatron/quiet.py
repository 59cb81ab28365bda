"""Known, harmless library noise, silenced by name where it arises (the house rule: every line a user sees
means something). Each entry says why it is safe to drop.

* Checkpoint load/save: torch.distributed.checkpoint warns (FutureWarning) that megatron-core's
  dist_checkpointing still uses ShardedTensor and ``load_state_dict``. megatron-core 0.16.1 is pinned;
  the warning is about its internals, not about anything a user can change. Printed by every rank.

megatron-core's "... because path_to_cache is None" dataset lines cannot arise: every dataset index has a
cache directory (data/index_cache.py).
"""

from __future__ import annotations

import warnings

CHECKPOINT_WARNINGS = (r"Please use DTensor instead and we are deprecating ShardedTensor",
                       r"`load_state_dict` is deprecated and will be removed")


def quiet_checkpoint_warnings() -> None:
    for message in CHECKPOINT_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
