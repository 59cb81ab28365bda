"""ROUGE-L: one pair, the mean, and Mol-Instructions' bootstrap median (SciDFM Table 9). rouge-score is
imported lazily. Conventions: docs/evaluation.md, "Metric conventions".
"""

from __future__ import annotations

from ._common import _check_pairs

_ROUGE = None


def _rouge_scorer():
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _ROUGE


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (LCS of tokens; P = LCS/len(pred), R = LCS/len(ref), F = 2PR/(P+R)).

    Tokenisation is rouge-score's default: lower-case, non-alphanumerics are separators, no stemming.
    """
    pred = pred if isinstance(pred, str) else ""  # e.g. a missing generation scores 0
    ref = ref if isinstance(ref, str) else ""
    return float(_rouge_scorer().score(ref, pred)["rougeL"].fmeasure)


def mean_rouge_l(preds: list[str], refs: list[str]) -> float:
    """Mean ROUGE-L F-measure over pairs (ValueError on empty or mismatched lists)."""
    n = _check_pairs(preds, refs, "mean_rouge_l")
    return sum(rouge_l(p, r) for p, r in zip(preds, refs, strict=True)) / n


def mol_instructions_rouge_l(preds: list[str], refs: list[str], seed: int = 0) -> dict:
    """ROUGE-L of Mol-Instructions' ``evaluation/protein/eval.py``, which calls Hugging Face ``evaluate``'s
    "rouge" metric with its defaults: rouge-score's ``RougeScorer(["rouge1", "rouge2", "rougeL",
    "rougeLsum"], use_stemmer=False)`` (default tokenizer), per-pair F-measures aggregated by rouge-score's
    ``BootstrapAggregator`` (1000 resamples of the pairs; the reported value is the *median* of the
    resample means, ``.mid.fmeasure``), numpy seeded with ``seed`` as ``evaluate.load("rouge",
    seed=seed)`` does (the caller's numpy random state is restored afterwards).

    Returns ``{"rouge_l": that value (Table 9's ROUGE-L), "rouge_l_mean": the plain mean of the per-pair
    F-measures}``. Equal to ``evaluate`` on tests/data/eval_reference/mol_instructions_protein_rouge.json.
    """
    import numpy as np
    from rouge_score import rouge_scorer, scoring

    n = _check_pairs(preds, refs, "mol_instructions_rouge_l")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    agg = scoring.BootstrapAggregator()
    per = []
    for p, r in zip(preds, refs, strict=True):
        sc = scorer.score(r if isinstance(r, str) else "", p if isinstance(p, str) else "")
        agg.add_scores(sc)
        per.append(sc["rougeL"].fmeasure)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        result = agg.aggregate()  # resamples rouge1, rouge2, rougeL, rougeLsum in that order, as evaluate does
    finally:
        np.random.set_state(state)
    return {"rouge_l": float(result["rougeL"].mid.fmeasure), "rouge_l_mean": float(sum(per) / n)}
