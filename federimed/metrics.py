"""Classification metrics, written out so their exact definitions are visible and tested."""

from __future__ import annotations

import numpy as np


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean F1 over the labels that occur in the truth (the labels a test set asks about)."""
    scores = []
    for label in np.unique(truth):
        tp = np.sum((predicted == label) & (truth == label))
        fp = np.sum((predicted == label) & (truth != label))
        fn = np.sum((predicted != label) & (truth == label))
        denominator = 2 * tp + fp + fn
        scores.append(2 * tp / denominator if denominator else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def classification_metrics(
    truth: np.ndarray, predicted: np.ndarray, unseen: set[int] | None = None
) -> dict[str, float]:
    """accuracy, macro-f1 and, for a hospital, accuracy on the conditions it never saw."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    metrics = {
        "accuracy": float(np.mean(truth == predicted)) if truth.size else 0.0,
        "macro_f1": macro_f1(truth, predicted),
    }
    if unseen:
        rows = np.isin(truth, sorted(unseen))
        metrics["unseen_accuracy"] = (
            float(np.mean(truth[rows] == predicted[rows])) if rows.any() else float("nan")
        )
    return metrics
