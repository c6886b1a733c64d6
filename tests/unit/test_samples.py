"""Sample images for the demo page: Fashion-MNIST test images, else warmup images."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from service.samples import (
    FASHION_MNIST_ABOUT,
    SAMPLE_COUNT,
    WARMUP_ABOUT,
    fashion_mnist_samples,
    samples_for,
    warmup_samples,
)
from service.training.export import warmup_records, write_warmup
from tests.helpers.images import gradient
from tests.helpers.models import SPEC

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CARD = {"training": {"dataset": "fashion_mnist"}}


def decoded(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def write_idx(path: Path, magic: int, array: np.ndarray, *, gz: bool) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_fashion_mnist_samples_are_test_images_of_distinct_classes() -> None:
    samples = fashion_mnist_samples(FASHION_MNIST)
    assert len(samples) == SAMPLE_COUNT
    assert len({s.label for s in samples}) == SAMPLE_COUNT
    first = samples[0]
    assert (first.label, first.source, first.about) == (
        "Ankle boot",
        "Fashion-MNIST test image 0",
        FASHION_MNIST_ABOUT,
    )
    image = decoded(first.png)
    assert (image.format, image.mode, image.size) == ("PNG", "L", (28, 28))


def test_fashion_mnist_reads_plain_idx_and_skips_missing_or_short_files(tmp_path: Path) -> None:
    images = np.arange(4 * 28 * 28).reshape(4, 28, 28) % 256
    write_idx(tmp_path / "t10k-images-idx3-ubyte", 0x0803, images, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", 0x0801, np.array([3, 3, 1, 9]), gz=False)
    samples = fashion_mnist_samples(tmp_path)
    assert [(s.label, s.source) for s in samples] == [
        ("Dress", "Fashion-MNIST test image 0"),
        ("Trouser", "Fashion-MNIST test image 2"),
        ("Ankle boot", "Fashion-MNIST test image 3"),
    ]
    assert np.array_equal(np.asarray(decoded(samples[1].png)), images[2])

    assert fashion_mnist_samples(tmp_path / "missing") == ()
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-2])  # header says 4 labels, 2 are there
    assert fashion_mnist_samples(tmp_path) == ()


def _warmup_log(pixels: np.ndarray) -> bytes:
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name="m", signature_name="serving_default")
    )
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(pixels))
    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )
    return log.SerializeToString()


def test_warmup_samples_are_the_distinct_non_uniform_images(tmp_path: Path) -> None:
    version = tmp_path / "1"
    (version / "assets.extra").mkdir(parents=True)
    picture = np.asarray(gradient(32, 32))
    records = [
        *warmup_records("m", SPEC),  # uniform grey: left out
        _warmup_log(np.stack([picture, picture, 255 - picture])),  # one repeat
    ]
    write_warmup(version / "assets.extra" / "tf_serving_warmup_requests", records)
    samples = warmup_samples(version)
    assert [(s.label, s.source, s.about) for s in samples] == [
        ("", "warmup request 2", WARMUP_ABOUT),
        ("", "warmup request 2", WARMUP_ABOUT),
    ]
    assert np.array_equal(np.asarray(decoded(samples[0].png)), picture)

    # A version not trained on Fashion-MNIST gets these; one that is gets the dataset's.
    assert samples_for(version, {}, FASHION_MNIST) == samples
    assert samples_for(version, FASHION_CARD, FASHION_MNIST)[0].label == "Ankle boot"
    # ...unless the dataset is not installed.
    assert samples_for(version, FASHION_CARD, tmp_path / "missing") == samples


def test_no_warmup_file_or_a_corrupt_one_gives_no_samples(tmp_path: Path) -> None:
    assert warmup_samples(tmp_path / "no-version") == ()
    extra = tmp_path / "1" / "assets.extra"
    extra.mkdir(parents=True)
    (extra / "tf_serving_warmup_requests").write_bytes(b"not a tfrecord")
    assert warmup_samples(tmp_path / "1") == ()
