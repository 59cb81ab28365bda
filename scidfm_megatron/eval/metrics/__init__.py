"""Evaluation metrics of the SciDFM paper (section 3) as pure functions, one module per family and optional
dependency: chemistry (RDKit, rapidfuzz, selfies), text (rouge-score), classification (scikit-learn),
math_answers (lm-eval). The harness hands them strings and numbers; no model code lives here. Where each
convention comes from, and how it was checked: docs/evaluation.md, "Metric conventions". Empty inputs and
mismatched list lengths raise ``ValueError`` naming both lengths.
"""

from .chemistry import (
    FINGERPRINT_KINDS,
    MOLECULE_CONVENTIONS,
    canonical_smiles,
    fingerprint_tanimoto,
    is_valid_smiles,
    levenshtein,
    mol_instructions_scores,
    molecule_generation_scores,
    molt5_scores,
)
from .classification import accuracy, auc_roc, moleculenet_auc
from .math_answers import (
    cut_at_stop_sequences,
    extract_gsm8k_answer,
    extract_math_answer,
    gsm8k_config,
    gsm8k_scores,
    math_answers_equal,
    math_scores,
    normalize_math_answer,
)
from .text import mean_rouge_l, mol_instructions_rouge_l, rouge_l

__all__ = [
    "canonical_smiles", "is_valid_smiles", "fingerprint_tanimoto", "levenshtein", "molecule_generation_scores",
    "mol_instructions_scores", "molt5_scores", "MOLECULE_CONVENTIONS",
    "rouge_l", "mean_rouge_l", "mol_instructions_rouge_l", "auc_roc", "moleculenet_auc", "gsm8k_scores", "math_scores",
    "extract_gsm8k_answer", "extract_math_answer",
    "normalize_math_answer", "math_answers_equal", "accuracy", "FINGERPRINT_KINDS",
    "gsm8k_config", "cut_at_stop_sequences",
]
