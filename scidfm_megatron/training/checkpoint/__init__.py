"""Checkpoints with megatron-core's dist_checkpointing: atomic, resumable, reshardable (docs/training.md)."""

from .save_load import (
    FORMATS,
    TOKENIZER_FILE,
    CheckpointMismatch,
    check_data_position,
    check_files,
    check_model_shapes,
    complete_checkpoints,
    find_resume,
    is_weights_only,
    iter_dir,
    load,
    masters_reloaded,
    read_meta,
    resolve,
    rng_state,
    save,
    saved_config,
    set_rng_state,
    tokenizer_file,
)

__all__ = [
    "FORMATS", "TOKENIZER_FILE", "CheckpointMismatch", "check_data_position", "check_files", "check_model_shapes",
    "complete_checkpoints", "find_resume", "is_weights_only", "iter_dir", "load", "masters_reloaded", "read_meta",
    "resolve", "rng_state", "save", "saved_config", "set_rng_state", "tokenizer_file",
]
