"""The committed default model: its numbers, and serving it over REST."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from service.preprocessing import PreprocessSpec, preprocess_bytes
from service.training.data import load_fashion_mnist
from service.training.evaluate import evaluate_version
from tests.helpers.images import encode
from tests.helpers.server import running_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"
VERSION = REPOSITORY / "fashion_mnist" / "1"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def card() -> dict[str, object]:
    loaded: dict[str, object] = json.loads(
        (VERSION / "assets.extra" / "model_card.json").read_text()
    )
    return loaded


def test_meets_the_accuracy_target(card: dict) -> None:  # type: ignore[type-arg]
    assert card["evaluation"]["accuracy"] >= 0.935


def test_was_trained_by_make_train(card: dict) -> None:  # type: ignore[type-arg]
    """The card's command is the Makefile's: `make train` reproduces the committed model."""
    makefile = (ROOT / "Makefile").read_text()
    train_args = re.search(r"^TRAIN_ARGS := (.*?)\n\n", makefile, re.MULTILINE | re.DOTALL)
    assert train_args is not None
    args = " ".join(train_args.group(1).replace("\\\n", " ").split())
    assert card["command"] == f"cnnserve train {args}"


def test_meets_its_other_targets(card: dict) -> None:  # type: ignore[type-arg]
    assert card["evaluation"]["accuracy"] >= 0.9
    assert card["evaluation"]["examples"] == 10_000
    assert card["dataset"]["test"] == 10_000
    assert card["runtimes"]["litert"]["verified"] is True
    size = sum(p.stat().st_size for p in VERSION.rglob("*") if p.is_file())
    assert size <= 15 * 1024 * 1024
    assert card["command"].startswith("cnnserve train --dataset fashion_mnist")


def test_evaluate_reproduces_the_card(card: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    report = evaluate_version(VERSION, data_dir=FASHION_MNIST, output=tmp_path, latency_runs=3)
    assert report["test_split_matches_card"] is True
    assert report["accuracy"] == pytest.approx(card["evaluation"]["accuracy"], abs=1e-9)
    assert (tmp_path / "confusion_matrix.png").is_file()


def test_gateway_serves_real_fashion_mnist_images(card: dict) -> None:  # type: ignore[type-arg]
    _, test = load_fashion_mnist(FASHION_MNIST)
    assert test.pixels is not None
    formats = ["PNG", "JPEG", "WEBP", "BMP"]
    images = [encode(Image.fromarray(test.pixels[i]), formats[i % 4]) for i in range(24)]
    pixels = np.stack([preprocess_bytes(b, PreprocessSpec(), max_pixels=10**8) for b in images])
    signature = tf.saved_model.load(str(VERSION)).signatures["serving_default"]
    expected = signature(image=tf.constant(pixels))["probabilities"].numpy()
    labels = card["labels"]
    with (
        running_server(REPOSITORY, args=("--poll-seconds", "0")) as server,
        server.client() as client,
    ):
        for data, probs in zip(images, expected, strict=True):
            r = client.post(
                "/v1/classify",
                params={"top_k": 3},
                content=data,
                headers={"content-type": "image/png"},
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["model"], body["version"]) == ("fashion_mnist", 1)
            top = body["predictions"][0]
            assert top["class_id"] == int(np.argmax(probs))
            assert top["label"] == labels[top["class_id"]]
            assert top["score"] == pytest.approx(float(probs.max()), abs=1e-4)
    correct = int((expected.argmax(axis=1) == test.labels[:24]).sum())
    assert correct >= 19
