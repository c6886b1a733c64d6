"""top_k's answer is a stable descending sort's, whatever the output's width: wide
outputs (ImageNet's 1,000 classes) take a partial sort that must agree with it on
ties, equal rows and NaN."""

from __future__ import annotations

import numpy as np
import pytest

from service.dataplane import WIDE_OUTPUT, top_k


def by_full_sort(probabilities: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-probabilities, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("classes", [3, 10, 5 * WIDE_OUTPUT + 1, 1000])
@pytest.mark.parametrize("case", ["random", "ties", "all equal", "nan"])
def test_top_k_is_a_stable_descending_sort(classes: int, case: str) -> None:
    rng = np.random.default_rng(classes)
    probabilities = rng.random((4, classes)).astype(np.float32)
    if case == "ties":  # ties across the k-th place: the lower index wins
        probabilities = np.round(probabilities * 3) / 3
    elif case == "all equal":
        probabilities[:] = 0.25
    elif case == "nan":
        probabilities[1, classes // 2] = np.nan
    k = min(5, classes)
    labels = [f"class {i}" for i in range(classes - 1)]  # the last one unnamed
    got = top_k(probabilities, k, labels)
    want = by_full_sort(probabilities, k)
    np.testing.assert_array_equal([[p.class_id for p in row] for row in got], want)
    scores = [[p.score for p in row] for row in got]
    np.testing.assert_array_equal(scores, np.take_along_axis(probabilities, want, axis=1))
    for row in got:
        for p in row:
            assert p.label == (labels[p.class_id] if p.class_id < len(labels) else str(p.class_id))
