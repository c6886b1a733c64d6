"""Confident learning and perceptual hashing on planted faults (numpy only, no model)."""

from __future__ import annotations

import numpy as np

from service.training.audit import THUMB, phash
from service.training.label_issues import confident_joint, find_label_issues


def noisy_predictions(
    n: int = 3000, k: int = 5, noise: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True labels, given labels with ``noise`` flipped, and probabilities from a decent
    but imperfect model of the true labels."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    logits = rng.normal(0, 1.0, (n, k))
    logits[np.arange(n), true] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    given = true.copy()
    flipped = rng.choice(n, int(noise * n), replace=False)
    given[flipped] = (true[flipped] + rng.integers(1, k, len(flipped))) % k
    return true, given, probs.astype(np.float32)


def test_planted_label_errors_rank_first_and_accuracy_is_estimated() -> None:
    true, given, probs = noisy_predictions()
    planted = set(np.flatnonzero(true != given).tolist())
    issues = find_label_issues(given, probs)
    top = set(issues.indices[: len(planted)].tolist())
    assert len(top & planted) >= 0.8 * len(planted)
    assert len(set(issues.indices.tolist()) & planted) >= 0.85 * len(planted)
    assert abs(issues.estimated_accuracy - 0.95) < 0.03
    assert np.all(np.diff(issues.scores) >= 0)  # most suspicious (lowest p(given)) first
    # Suggestions are the model's view of the true label.
    suggested = dict(zip(issues.indices.tolist(), issues.suggested.tolist(), strict=True))
    right = [suggested[i] == true[i] for i in planted if i in suggested]
    assert np.mean(right) > 0.9


def test_clean_labels_are_estimated_clean() -> None:
    true, _, probs = noisy_predictions(noise=0.0)
    issues = find_label_issues(true, probs)
    assert issues.estimated_accuracy > 0.985
    assert len(issues.indices) < 0.02 * len(true)


def test_joint_is_a_distribution_with_given_label_marginals() -> None:
    _, given, probs = noisy_predictions()
    joint = confident_joint(given, probs)
    assert joint.sum() == np.float64(1.0) or abs(joint.sum() - 1) < 1e-9
    np.testing.assert_allclose(joint.sum(axis=1), np.bincount(given) / len(given), atol=1e-9)


def test_phash_sees_near_copies_and_tells_different_images_apart() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:THUMB, :THUMB]

    def blobs() -> np.ndarray:  # a few soft shapes, as photos of objects have
        out = np.zeros((THUMB, THUMB))
        for _ in range(3):
            y, x, r = rng.uniform(4, THUMB - 4), rng.uniform(4, THUMB - 4), rng.uniform(3, 8)
            out += 200 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * r * r))
        return out

    image, other = blobs(), blobs()
    near = image + rng.normal(0, 2, image.shape)  # re-encoded, with a small mark
    near[:3, :3] += 10
    hashes = phash(np.stack([image, near, other]).astype(np.float32))
    bits = [bin(int(hashes[0] ^ h)).count("1") for h in hashes[1:]]
    assert bits[0] <= 4 < 16 <= bits[1]
