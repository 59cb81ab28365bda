"""Evaluation helpers: metrics (metrics/, one module per family) and lm-eval on converted Hugging Face checkpoints
(lm_eval_local.py, docs/lm_eval.md)."""
