"""Per-class average precision and mAP in the classification report; `cnnserve evaluate`'s
refusals of data and cards it cannot score with."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from service.training.evaluate import average_precision, classification_report
from tests.helpers.images import write_class_folders
from tests.helpers.models import publish_tiny

CLASSES = ["class_0", "class_1", "class_2"]


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


def _version_trained_on(tmp_path: Path, labels: list[str]) -> tuple[Path, Path]:
    """A published version (random weights) whose card says it was trained on a folder
    of class_0..class_2; returns the version and that folder."""
    data = write_class_folders(tmp_path / "data", classes=3, per_class=6)
    version = publish_tiny(tmp_path / "repo", "m", labels=labels)
    path = version / "assets.extra" / "model_card.json"
    card = json.loads(path.read_text())
    split = {"val_fraction": 0.2, "test_fraction": 0.5, "seed": 0}
    card["training"] = {"dataset": str(data), "data_dir": str(tmp_path), **split}
    path.write_text(json.dumps(card))
    return version, data


def _add_class(data: Path, name: str) -> None:
    # Other pixels than class_0's: identical copies under two labels would be dropped.
    write_class_folders(data.parent / "more", classes=1, per_class=6, size=24)
    (data.parent / "more" / "class_0").rename(data / name)


@pytest.mark.parametrize(
    ("labels", "change", "told"),
    [
        # Every id shifted, the last past the model's outputs (an IndexError traceback).
        pytest.param(
            CLASSES, lambda d: _add_class(d, "a_new"), "extra 'a_new'", id="one more, first"
        ),
        # The ids after it meant other classes (exit 0, misaligned).
        pytest.param(
            CLASSES, lambda d: shutil.rmtree(d / "class_1"), "missing 'class_1'", id="one less"
        ),
        # An accuracy of 0 with exit 0.
        pytest.param(
            CLASSES,
            lambda d: (d / "class_2").rename(d / "kitten"),
            "missing 'class_2'; extra 'kitten'",
            id="renamed",
        ),
        pytest.param(
            ["class_1", "class_0", "class_2"],
            lambda d: None,
            "the same classes in another order",
            id="reordered",
        ),
    ],
)
def test_evaluate_refuses_data_whose_classes_are_not_the_models(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    labels: list[str],
    change: Callable[[Path], None],
    told: str,
) -> None:
    version, data = _version_trained_on(tmp_path, labels)
    change(data)
    code = main(["evaluate", str(version), "--data-dir", str(data), "--latency-runs", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("cnnserve: the test data's classes differ from ") and told in last, last


def test_evaluate_names_a_model_card_that_is_not_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version, _ = _version_trained_on(tmp_path, CLASSES)
    card = version / "assets.extra" / "model_card.json"
    card.write_text('{"labels":\n')  # cut short
    assert main(["evaluate", str(version), "--latency-runs", "1"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"cnnserve: {card}: unreadable model card: Expecting value: line 2 column 1 (char 11)\n"
    )
