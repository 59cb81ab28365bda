"""Classification scores: AUC-ROC (MoleculeNet, SciDFM Table 7) and accuracy. scikit-learn is imported lazily."""

from __future__ import annotations

import math

from ._common import _check_pairs


def auc_roc(labels: list[int], scores: list[float]) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive), ties counted half.

    Raises ValueError for mismatched lengths, labels other than 0/1, non-finite scores, or when only one
    class is present (AUC is undefined then).
    """
    _check_pairs(labels, scores, "auc_roc", ("labels", "scores"))
    ys = []
    for y in labels:
        if y not in (0, 1):  # also accepts True/False and 0.0/1.0
            raise ValueError(f"auc_roc: labels must be 0 or 1, got {y!r}")
        ys.append(int(y))
    xs = [float(s) for s in scores]
    if not all(math.isfinite(x) for x in xs):
        raise ValueError("auc_roc: scores must be finite numbers (got NaN or inf)")
    present = set(ys)
    if len(present) < 2:
        only = "positive (1)" if present == {1} else "negative (0)"
        raise ValueError(f"auc_roc: only one class present in labels (all {len(ys)} are {only}); "
                         "AUC-ROC needs both positives and negatives")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(ys, xs))


def moleculenet_auc(labels: list[int], scores: list[float], tasks: list[str]) -> dict:
    """MoleculeNet's multi-task AUC-ROC: one AUC per task (``tasks[i]`` names the task of example i, e.g.
    Tox21's "NR-AR"; a single-task dataset has one task), the dataset's figure their mean (Wu et al. 2018,
    MoleculeNet; as in DeepChem / chemprop, a task whose examples are all of one class has no AUC and is
    left out, listed under ``skipped_tasks``). Returns ``{"auc_roc": mean %, "auc_per_task": {task: %},
    "skipped_tasks": [...]}``; ValueError when no task has both classes."""
    _check_pairs(labels, scores, "moleculenet_auc", ("labels", "scores"))
    _check_pairs(labels, tasks, "moleculenet_auc", ("labels", "tasks"))
    by: dict = {}
    for y, x, t in zip(labels, scores, tasks, strict=True):
        by.setdefault(t, ([], []))
        by[t][0].append(y)
        by[t][1].append(x)
    per, skipped = {}, []
    for t, (ys, xs) in by.items():
        if len(set(int(y) for y in ys)) < 2:
            skipped.append(t)
            continue
        per[t] = 100 * auc_roc(ys, xs)
    if not per:
        raise ValueError(f"moleculenet_auc: no task has both positive and negative examples "
                         f"(tasks: {sorted(by)}); AUC-ROC is undefined")
    return {"auc_roc": sum(per.values()) / len(per), "auc_per_task": per, "skipped_tasks": skipped}


def accuracy(preds: list, golds: list) -> float:
    """Fraction of positions where ``preds[i] == golds[i]`` (ValueError on empty or mismatched lists)."""
    n = _check_pairs(preds, golds, "accuracy", ("preds", "golds"))
    return sum(1 for p, g in zip(preds, golds, strict=True) if p == g) / n
