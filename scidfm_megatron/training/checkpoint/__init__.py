"""Checkpoints with megatron-core's dist_checkpointing: atomic, resumable, reshardable (docs/training.md,
"Checkpoints"). ``directory``: the save directory's layout and metadata (also read by inference and
conversion); ``integrity``: checks before and after a load; ``reshard``: optimizer state across
EP=1 <-> EP>1; ``save_load``: save and load. Every public name is re-exported here."""

from ...errors import CheckpointMismatch  # defined in scidfm_megatron/errors.py
from .directory import (
    TOKENIZER_FILE,
    complete_checkpoints,
    find_resume,
    is_weights_only,
    iter_dir,
    read_meta,
    resolve,
    saved_config,
    tokenizer_file,
)
from .integrity import check_data_position, check_files, check_model_shapes, masters_reloaded
from .reshard import across_ep
from .save_load import FORMATS, load, rng_state, save, set_rng_state

__all__ = [
    "FORMATS", "TOKENIZER_FILE", "CheckpointMismatch", "across_ep", "check_data_position", "check_files",
    "check_model_shapes", "complete_checkpoints", "find_resume", "is_weights_only", "iter_dir", "load",
    "masters_reloaded", "read_meta", "resolve", "rng_state", "save", "saved_config", "set_rng_state",
    "tokenizer_file",
]
