"""Evaluation helpers: metrics (metrics.py) and lm-eval on converted Hugging Face checkpoints
(lm_eval_local.py, docs/lm_eval.md)."""
