"""`cnnserve verify`'s verdict: a skew fails it, what an encoding moves does not."""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
import pytest

from service.verify import EncodingResult, Report, compare, print_report

LABELS = ["a", "b", "c"]


def probabilities(tops: list[int]) -> npt.NDArray[np.float32]:
    out = np.full((len(tops), 3), 0.1, np.float32)
    out[np.arange(len(tops)), tops] = 0.8
    return out


def result(
    encoding: str, same_bytes: list[int], source: list[int], served: list[int]
) -> EncodingResult:
    return compare(
        encoding,
        probabilities(same_bytes),
        probabilities(source),
        served,
        [0.8] * len(served),
        [None] * len(served),
        LABELS,
        [f"image{i}" for i in range(len(served))],
    )


def test_answers_the_encoding_moves_are_reported_but_do_not_fail() -> None:
    served = [0] * 100
    source = [0] * 95 + [1] * 5  # JPEG moved 5 of 100 answers on both sides alike
    r = result("jpeg", served, source, served)
    assert r.passed and r.agreement == 1.0 and r.agreement_source == 0.95
    assert r.disagreements == []
    out = io.StringIO()
    print_report(Report("m", 1, "url", 100, None, [r], 1.0), out, show=5)
    text = out.getvalue()
    assert "agreement 100.00% with offline on the same bytes (>= 99.0%: ok" in text
    assert "source pixels 95.00% (what JPEG itself changes" in text


def test_a_skew_on_the_same_bytes_fails_and_lists_the_images() -> None:
    same_bytes = [0] * 100
    served = [0] * 98 + [2] * 2  # the server answers differently on the same bytes
    r = result("png", same_bytes, same_bytes, served)
    assert not r.passed and r.agreement == 0.98
    assert [d["index"] for d in r.disagreements] == [98, 99]
    assert r.disagreements[0]["offline"] == "a" and r.disagreements[0]["served"] == "c"
    report = Report("m", 1, "url", 100, None, [r], 1.0)
    assert not report.passed and report.to_dict()["encodings"]["png"]["agreement"] == 0.98
    out = io.StringIO()
    print_report(report, out, show=5)
    assert "FAIL" in out.getvalue() and "image98" in out.getvalue()


def test_a_card_without_its_recipe_gets_images_said_to_be_off_its_record() -> None:
    """A version with no card (or one written elsewhere) was sent Fashion-MNIST's test
    set without a word: for a folder model, images of no class it knows."""
    from service.config import Settings
    from service.verify import card_test_images

    for card in ({}, {"training": None}, {"training": []}):
        images = card_test_images(card, Settings().fashion_mnist_dir, limit=3)
        assert len(images.pixels) == 3
        assert images.source.startswith(
            "Fashion-MNIST's test set: this version's model card does not record its test split"
        )


@pytest.mark.parametrize(
    "training",
    [{}, {"dataset": None}, {"dataset": 3}, {"dataset": "/data", "extra_datasets": "/more"}],
)
def test_a_recipe_without_its_datasets_asks_for_data_not_images_from_none(
    training: dict[str, object],
) -> None:
    """A card written by hand said 'tested on images from None, which is not a folder'."""
    from service.config import Settings
    from service.errors import DatasetError
    from service.verify import card_test_images

    with pytest.raises(DatasetError) as caught:
        card_test_images({"training": training}, Settings().fashion_mnist_dir, limit=3)
    said = str(caught.value)
    assert "None" not in said and "training.dataset" in said and "--data" in said
