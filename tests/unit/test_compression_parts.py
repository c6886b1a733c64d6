"""The pieces of `cnnserve compress` that need no model: the pruning schedule and masks,
and the load-time check that accepts or refuses a quantized artifact by its card."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.errors import ModelLoadError
from service.runtimes.card import artifact_precision, quantized_refusal, verified_litert
from service.training.compression.prune import magnitude_mask, polynomial_sparsity


def test_polynomial_schedule_rises_fast_then_flattens_at_the_target() -> None:
    values = [polynomial_sparsity(t, initial=0.0, final=0.5, begin=0, end=100) for t in range(101)]
    assert values[0] == 0.0 and values[100] == 0.5
    assert all(b >= a for a, b in itertools.pairwise(values))
    # Cubic: nearly half the target within the first fifth of the steps (1 - 0.8³).
    assert values[20] == pytest.approx(0.5 * (1 - 0.8**3)) and values[80] > 0.49
    assert polynomial_sparsity(500, initial=0.0, final=0.5, begin=0, end=100) == 0.5


def test_magnitude_mask_drops_the_smallest_weights() -> None:
    values = np.array([[0.1, -0.9, 0.05], [-0.3, 0.7, -0.01]], np.float32)
    mask = magnitude_mask(values, 0.5)
    np.testing.assert_array_equal(mask, [[0, 1, 0], [1, 1, 0]])
    assert magnitude_mask(values, 0.0).all()


def quantized_card(path: Path, content: bytes, **overrides: Any) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    record = {
        "file": path.name,
        "precision": "int8",
        "sha256": hashlib.sha256(content).hexdigest(),
        "top1_agreement": 0.99,
        "accuracy_delta": -0.002,
        "thresholds": {"min_top1_agreement": 0.98, "max_accuracy_drop": 0.01},
        **overrides,
    }
    return {"runtimes": {"litert": record}}


def test_a_quantized_artifact_is_accepted_by_its_measured_figures(tmp_path: Path) -> None:
    path = tmp_path / "assets.extra" / "model_int8.tflite"
    card = quantized_card(path, b"int8 flatbuffer")
    assert artifact_precision(card) == "int8"
    # No 1e-4 max_abs_diff and no "verified" flag: the agreement and accuracy decide.
    assert verified_litert(tmp_path, card) == path
    assert artifact_precision({}) == "float32"


@pytest.mark.parametrize(
    "overrides,reason",
    [
        ({"top1_agreement": 0.95}, "top-1"),
        ({"accuracy_delta": -0.03}, "test accuracy"),
        ({"sha256": "0" * 64}, "sha256"),
        ({"thresholds": {}}, "no measured agreement"),
    ],
)
def test_a_quantized_artifact_that_drifted_is_refused(
    tmp_path: Path, overrides: dict[str, Any], reason: str
) -> None:
    path = tmp_path / "assets.extra" / "model_int8.tflite"
    card = quantized_card(path, b"int8 flatbuffer", **overrides)
    refusal = quantized_refusal(card["runtimes"]["litert"], path)
    assert refusal is not None and reason in refusal
    with pytest.raises(ModelLoadError, match="refusing to serve it"):
        verified_litert(tmp_path, card)


def test_a_missing_quantized_artifact_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "assets.extra" / "model_int8.tflite"
    card = quantized_card(path, b"x")
    path.unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        verified_litert(tmp_path, card)


def test_cli_thresholds_are_the_card_defaults() -> None:
    from service.cli import build_parser
    from service.config import Settings
    from service.runtimes.card import MAX_ACCURACY_DROP, MIN_TOP1_AGREEMENT

    args = build_parser(Settings()).parse_args(["compress", "--method", "int8"])
    assert (args.min_agreement, args.max_accuracy_drop) == (MIN_TOP1_AGREEMENT, MAX_ACCURACY_DROP)


def test_distillation_loss_is_zero_only_when_the_student_matches_the_teacher() -> None:
    import keras

    from service.training.compression.distill import distillation_loss

    teacher = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    y_true = np.concatenate([np.array([[0.0], [2.0]], np.float32), teacher], axis=1)
    soft_only = distillation_loss(temperature=4.0, alpha=0.0)
    same = keras.ops.convert_to_numpy(soft_only(y_true, teacher))
    np.testing.assert_allclose(same, 0.0, atol=1e-5)
    other = np.array([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]], np.float32)
    moved = keras.ops.convert_to_numpy(soft_only(y_true, other))
    assert moved[0] > 0.1 and abs(moved[1]) < 1e-5
    # alpha = 1 is plain cross-entropy on the labels in column 0.
    hard = keras.ops.convert_to_numpy(distillation_loss(4.0, 1.0)(y_true, other))
    np.testing.assert_allclose(hard, -np.log([0.2, 0.8]), rtol=1e-5)


def test_distillation_loss_is_hintons_for_a_confident_teacher() -> None:
    """Computed from probabilities, it equals the loss from logits (float64) also when
    classes are far below 1e-7, as a well-trained teacher's are (a floor at 1e-7 was off
    by 6 on such logits)."""
    import keras

    from service.training.compression.distill import distillation_loss

    def softmax(z: Any, t: float = 1.0) -> Any:
        e = np.exp((z - z.max(-1, keepdims=True)) / t)
        return e / e.sum(-1, keepdims=True)

    rng = np.random.default_rng(0)
    teacher_logits = rng.normal(0, 1, (8, 10)) + 25 * np.eye(10)[rng.integers(0, 10, 8)]
    student_logits = rng.normal(0, 3, (8, 10))
    labels = rng.integers(0, 10, 8)
    t, alpha = 4.0, 0.1
    pt, ps = softmax(teacher_logits, t), softmax(student_logits, t)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(-1)
    hard = -np.log(softmax(student_logits)[np.arange(8), labels])
    expected = alpha * hard + (1 - alpha) * t**2 * kl
    assert softmax(teacher_logits).min() < 1e-9  # the case the floor distorted
    y_true = np.concatenate([labels[:, None], softmax(teacher_logits)], 1).astype(np.float32)
    loss = distillation_loss(t, alpha)(y_true, softmax(student_logits).astype(np.float32))
    assert np.allclose(keras.ops.convert_to_numpy(loss), expected, rtol=1e-3, atol=1e-3)
