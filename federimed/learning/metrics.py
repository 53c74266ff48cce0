"""Classification metrics, written out so their exact definitions are visible and tested."""

from __future__ import annotations

import numpy as np

CALIBRATION_BINS = 15  # equal-width confidence bins of the expected calibration error
TOP_K = 3  # a clinician reads a short ranked list: is the right diagnosis in its first three


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


def top_k_accuracy(truth: np.ndarray, proba: np.ndarray, k: int = TOP_K) -> float:
    """The share of cases whose true label is among the ``k`` most probable (ties: the lower
    index first, as ``argsort`` breaks them)."""
    truth = np.asarray(truth)
    if not truth.size:
        return 0.0
    top = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    return float(np.mean((top == truth[:, None]).any(axis=1)))


def expected_calibration_error(
    truth: np.ndarray, proba: np.ndarray, bins: int = CALIBRATION_BINS
) -> float:
    """How far the top prediction's probability is from how often it is right: the mean over
    equal-width confidence bins of |accuracy - mean confidence|, weighted by the bin's share of
    cases (0: a case given 70% is right 70% of the time)."""
    truth = np.asarray(truth)
    if not truth.size:
        return 0.0
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == truth
    # bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of 0 goes to the first
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    error = 0.0
    for b in np.unique(which):
        rows = which == b
        error += rows.mean() * abs(correct[rows].mean() - confidence[rows].mean())
    return float(error)


def probability_metrics(
    truth: np.ndarray, proba: np.ndarray, unseen: set[int] | None = None
) -> dict[str, float]:
    """:func:`classification_metrics` of the top prediction, plus what a ranked list with
    probabilities adds: top-3 accuracy and the expected calibration error."""
    truth = np.asarray(truth)
    metrics = classification_metrics(truth, proba.argmax(axis=1), unseen)
    metrics["top3_accuracy"] = top_k_accuracy(truth, proba)
    metrics["ece"] = expected_calibration_error(truth, proba)
    return metrics
