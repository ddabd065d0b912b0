"""GLUE metrics, computed locally with scikit-learn and SciPy (nothing is downloaded).

Every metric takes (predictions, labels) as 1-D arrays: class ids for classification,
floats for regression, and returns a float in the metric's natural range (accuracy 0..1).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# scikit-learn and SciPy are imported by the metric that needs them: configs name metrics, and training (on a
# GPU image without either) reads configs.


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(labels, preds))


def f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of the positive class (id 1), as GLUE reports for MRPC and QQP."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, average="binary", pos_label=1, zero_division=0))


def macro_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of per-class F1, for multi-class tasks of your own."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, average="macro", zero_division=0))


def mcc(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (CoLA); 0 when a model predicts one class only."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, preds))


def _constant(x: np.ndarray) -> bool:
    return bool(np.all(x == x[0]))


def pearson(preds: np.ndarray, labels: np.ndarray) -> float:
    # A constant prediction has no correlation; SciPy would return nan with a warning.
    if len(preds) < 2 or _constant(preds) or _constant(labels):
        return 0.0
    from scipy.stats import pearsonr

    return float(pearsonr(preds, labels)[0])


def spearman(preds: np.ndarray, labels: np.ndarray) -> float:
    if len(preds) < 2 or _constant(preds) or _constant(labels):
        return 0.0
    from scipy.stats import spearmanr

    return float(spearmanr(preds, labels)[0])


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(names: tuple[str, ...] | list[str], preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{name: value} for each metric name."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    return {name: METRICS[name](preds, labels) for name in names}
