import numpy as np
import pytest

from federimed.metrics import classification_metrics, macro_f1


def test_macro_f1_matches_hand_computation():
    truth = np.array([0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0])
    # F1: class0 = 2*1/(2+1+1)=0.5, class1 = 2*2/(4+1+0)=0.8, class2 = 0
    assert macro_f1(truth, predicted) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_unseen_accuracy_only_counts_the_unseen_rows():
    truth = np.array([0, 1, 2, 2])
    predicted = np.array([0, 0, 2, 1])
    metrics = classification_metrics(truth, predicted, unseen={2})
    assert metrics["accuracy"] == 0.5
    assert metrics["unseen_accuracy"] == 0.5
    assert "unseen_accuracy" not in classification_metrics(truth, predicted)
