import numpy as np
import pytest

from federimed.learning.metrics import (
    classification_metrics,
    expected_calibration_error,
    macro_f1,
    probability_metrics,
    top_k_accuracy,
)


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


def test_top3_accuracy_counts_a_true_label_anywhere_in_the_first_three():
    proba = np.array(
        [
            [0.1, 0.2, 0.3, 0.4],  # truth 3: first
            [0.4, 0.3, 0.2, 0.1],  # truth 2: third
            [0.4, 0.3, 0.2, 0.1],  # truth 3: fourth, a miss
        ]
    )
    assert top_k_accuracy(np.array([3, 2, 3]), proba) == pytest.approx(2 / 3)
    assert top_k_accuracy(np.array([3, 2, 3]), proba, k=1) == pytest.approx(1 / 3)


def test_expected_calibration_error_matches_hand_computation():
    # Two cases at confidence 0.9 (one right: accuracy 0.5), two at 0.6 (both right).
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    truth = np.array([0, 1, 1, 1])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert expected_calibration_error(truth, proba) == pytest.approx(expected)
    # Perfectly calibrated: confident and always right.
    assert expected_calibration_error(np.array([0, 1]), np.eye(2)) == 0.0


def test_probability_metrics_add_ranking_and_calibration_to_the_top_prediction():
    proba = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    metrics = probability_metrics(np.array([0, 2, 2]), proba, unseen={2})
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["unseen_accuracy"] == 0.0
    assert metrics["top3_accuracy"] == 1.0
    assert 0 < metrics["ece"] < 1
