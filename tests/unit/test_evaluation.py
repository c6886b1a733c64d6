"""Per-class average precision and mAP in the classification report."""

from __future__ import annotations

import numpy as np
import pytest

from service.training.evaluate import average_precision, classification_report


def test_average_precision_by_hand() -> None:
    # Ranked by score: +, -, +, -  → precision at the hits: 1/1 and 2/3 → AP = 5/6.
    positive = np.array([True, False, True, False])
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    assert average_precision(positive, scores) == pytest.approx(5 / 6)


def test_tied_scores_are_one_threshold() -> None:
    # All tied: one threshold at recall 1 with precision 2/4, whatever the order.
    positive = np.array([True, False, False, True])
    assert average_precision(positive, np.full(4, 0.5)) == pytest.approx(0.5)


def test_perfect_ranking_is_one_and_no_positives_is_none() -> None:
    assert average_precision(np.array([True, True, False]), np.array([3.0, 2.0, 1.0])) == 1.0
    assert average_precision(np.array([False, False]), np.array([0.2, 0.1])) is None


def test_report_carries_per_class_ap_and_their_mean() -> None:
    labels = np.array([0, 0, 1, 1, 2])
    probabilities = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.3, 0.6, 0.1],  # class 0 ranked below a class-1 image for class 1
            [0.2, 0.7, 0.1],
            [0.1, 0.8, 0.1],
            [0.1, 0.1, 0.8],
        ],
        dtype=np.float32,
    )
    predicted = probabilities.argmax(1)
    report = classification_report(labels, predicted, ["a", "b", "c"], probabilities)
    aps = [report["per_class"][name]["average_precision"] for name in "abc"]
    # class a: scores 0.8(+) 0.3(+) 0.2 0.1 0.1 → AP 1; class b: 0.8(+) 0.7(+) 0.6(-) → 1;
    # class c: 0.8(+) first → 1. Then make one class imperfect and check the mean moves.
    assert aps == [1.0, 1.0, 1.0] and report["mean_average_precision"] == 1.0
    probabilities[1] = [0.05, 0.9, 0.05]  # a class-0 image now tops class b's ranking
    report = classification_report(labels, probabilities.argmax(1), ["a", "b", "c"], probabilities)
    # class a: 0.8(+) 0.2 0.1 0.1 0.05(+) → (1 + 2/5) / 2; class b: 0.9(-) 0.8(+) 0.7(+).
    a = report["per_class"]["a"]["average_precision"]
    b = report["per_class"]["b"]["average_precision"]
    assert a == pytest.approx((1 + 2 / 5) / 2)
    assert b == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert report["mean_average_precision"] == pytest.approx((a + b + 1.0) / 3)


def test_without_probabilities_the_report_has_no_map() -> None:
    report = classification_report(np.array([0, 1]), np.array([0, 1]), ["a", "b"])
    assert "mean_average_precision" not in report


def test_macro_means_skip_classes_without_test_examples() -> None:
    # "c" has no test image: its F1 of 0 used to count as a third of the macro mean.
    report = classification_report(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 2]), ["a", "b", "c"])
    assert report["per_class"]["c"]["support"] == 0
    assert report["macro_recall"] == pytest.approx((1 + 0.5) / 2)
    assert report["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert report["classes_without_examples"] == ["c"]
    full = classification_report(np.array([0, 1, 2]), np.array([0, 1, 2]), ["a", "b", "c"])
    assert full["macro_f1"] == 1.0 and "classes_without_examples" not in full
