"""The SavedModel's in-graph decoder (what a TF Serving runs for `predict_image_bytes`)
against the gateway's preprocessing, on the same bytes: orientation and transparency
were ignored in the graph, so a phone photo or a cut-out got another class there."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from service.preprocessing import PreprocessSpec, preprocess_bytes
from service.training.graph_decode import decode_for_model, exif_orientation
from tests.helpers.images import encode, gradient

SPEC = PreprocessSpec()


@tf.function(input_signature=[tf.TensorSpec([], tf.string)])
def in_graph(data: tf.Tensor) -> tf.Tensor:
    return decode_for_model(data, SPEC)


def oriented(fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    return encode(gradient(64, 32), fmt, exif=exif, **options)


def cut_out(fmt: str) -> bytes:
    """A dark garment on a transparent background whose hidden colour is black."""
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[10:38, 14:34] = (60, 40, 20, 255)
    image = Image.fromarray(rgba, "RGBA")
    if fmt == "palette":
        return encode(image.convert("P"), "PNG", transparency=0)
    if fmt == "LA":
        return encode(image.convert("LA"), "PNG")
    return encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))


def grey_keyed() -> bytes:
    grey = np.full((32, 32), 200, np.uint8)
    grey[8:24, 8:24] = 0
    return encode(Image.fromarray(grey, "L"), "PNG", transparency=200)


CASES = {
    **{f"jpeg-o{o}": oriented("JPEG", o) for o in range(1, 9)},
    "png-exif-o6": oriented("PNG", 6),
    "webp-exif-o8": oriented("WEBP", 8),
    "png-rgba": cut_out("PNG"),
    "png-palette-trns": cut_out("palette"),
    "png-la": cut_out("LA"),
    "png-grey-trns": grey_keyed(),
    "webp-alpha": cut_out("WEBP"),
    "gif": encode(gradient(), "GIF"),
    "bmp": encode(gradient(), "BMP"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_graph_decodes_as_the_gateway_does(name: str) -> None:
    data = CASES[name]
    gateway = preprocess_bytes(data, SPEC, max_pixels=10**8).astype(np.int16)
    graph = in_graph(tf.constant(data)).numpy().astype(np.int16)
    assert graph.shape == gateway.shape == (224, 224, 3)
    # Another decoder and resizer: close (a JPEG's last bits), never turned or inverted
    # (a wrong orientation or background is off by ~50 on average).
    diff = np.abs(graph - gateway)
    assert diff.mean() < 2.0 and np.percentile(diff, 99) < 25, (diff.mean(), diff.max())


def test_orientation_is_read_from_each_container_and_defaults_to_1() -> None:
    for fmt in ("JPEG", "PNG", "WEBP"):
        for orientation in (1, 3, 6, 8):
            got = int(exif_orientation(tf.constant(oriented(fmt, orientation))))
            assert got == orientation, (fmt, orientation)
    for data in (encode(gradient(), "JPEG"), oriented("JPEG", 9), b"", b"\xff\xd8\xff"):
        assert int(exif_orientation(tf.constant(data))) == 1


def test_files_the_graph_cannot_decode_are_refused_not_a_crash() -> None:
    """TF 2.21 corrupted its heap on an animated WebP decoded with channels=0: the
    process died (a TF Serving with it)."""
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    animated = io.BytesIO()
    frames[0].save(animated, "WEBP", save_all=True, append_images=frames[1:], duration=10)
    for data in (animated.getvalue(), b"not an image", encode(gradient(), "TIFF")):
        with pytest.raises(tf.errors.InvalidArgumentError):
            in_graph(tf.constant(data))


def test_the_committed_default_model_carries_it() -> None:
    """Re-exported with the in-graph decoder: a sample turned on its side and tagged
    with EXIF orientation 8 gets the gateway's answer from TF Serving's signature."""
    from pathlib import Path

    version = Path(__file__).parents[2] / "model_repository" / "fashion_mnist" / "1"
    loaded = tf.saved_model.load(str(version))
    sample = Image.open(version.parents[2] / "docs" / "samples" / "ankle_boot.png").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 8  # shown turned 90° counter-clockwise: stored turned clockwise
    data = encode(sample.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95, exif=exif)
    by_bytes = loaded.signatures["predict_image_bytes"](image_bytes=tf.constant([data]))
    pixels = preprocess_bytes(data, SPEC, max_pixels=10**8)[None]
    by_pixels = loaded.signatures["serving_default"](image=tf.constant(pixels))
    graph, gateway = by_bytes["probabilities"].numpy()[0], by_pixels["probabilities"].numpy()[0]
    assert graph.argmax() == gateway.argmax() == 9  # Ankle boot
    np.testing.assert_allclose(graph, gateway, atol=0.02)
