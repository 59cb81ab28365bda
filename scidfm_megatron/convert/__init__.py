"""Checkpoint conversion between megatron-core (any layout) and Hugging Face (Mixtral layout)."""
