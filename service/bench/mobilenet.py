"""MobileNetV3-Small built inside the benchmark (``--model-kind mobilenet_v3_small``).

The performance issue measures cnnserve against its peers on a stock architecture, not
only on the small committed model: ``keras.applications.MobileNetV3Small`` with
``weights=None`` (seeded, so every run builds the same weights), 1000 classes as on
ImageNet, and the input contract every cnnserve version follows (uint8 [N,224,224,3]
``image`` → float32 ``probabilities``; the ``x / 127.5 - 1`` scaling is Keras's own
``include_preprocessing`` layer, inside the graph). It is exported with the exporter
training uses and converted by cnnserve's own LiteRT conversion, which keeps the float
artifact only when it reproduces the SavedModel, so the gateway serves it with LiteRT,
unquantized. Nothing of it is committed: it lives in a temporary model repository.

Freshly initialized, the network's batch-norm statistics (mean 0, variance 1) do not fit
its activations, which fade out before the classifier: every image would get the same
uniform answer, and comparing answers would prove nothing. So the statistics are set
once from a batch of seeded photo-like pictures (a data-dependent initialization, as
after one training step at momentum 0); the answers then differ from image to image.

:func:`check_answers` is what the bench runs before measuring: the gateway's REST top-5
against TensorFlow's own SavedModel on the same preprocessed pixels.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from service.config import Settings
from service.contract import BYTES_SIGNATURE, INPUT_NAME, SERVING_SIGNATURE

MODEL_NAME = "mobilenet_v3_small"
NUM_CLASSES = 1000
SEED = 0
# The issue's bound: top-5 and scores equal to TensorFlow's to 1e-3 (no silent quantization).
ANSWER_TOLERANCE = 1e-3
# With 1000 classes the scores are small, so the order must hold much tighter than that:
# two classes may swap places only when TensorFlow's scores for them are this close.
TIE_TOLERANCE = 1e-6
CALIBRATION_IMAGES = 16
TOP_K = 5
NORMALIZATION = {
    "scale": 1 / 127.5,
    "offset": -1.0,
    "formula": "x / 127.5 - 1",
    "where": "inside the graph (keras.applications include_preprocessing)",
}


def build_keras(seed: int = SEED, *, alpha: float = 1.0, classes: int = NUM_CLASSES) -> Any:
    """The Keras model: uint8 pixels in, softmax over ``classes`` out; same seed, same
    weights."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((224, 224, 3), dtype="uint8", name=INPUT_NAME)
    net = keras.applications.MobileNetV3Small(
        input_shape=(224, 224, 3),
        alpha=alpha,
        weights=None,
        classes=classes,
        include_preprocessing=True,
        classifier_activation="softmax",
    )
    model = keras.Model(inputs, net(keras.ops.cast(inputs, "float32")), name=MODEL_NAME)
    _calibrate(model, seed)
    return model


def _calibrate(model: Any, seed: int) -> None:
    """Batch-norm moving statistics := those of one batch of seeded pictures."""
    import keras

    from service.bench.photos import photo

    rng = np.random.default_rng(seed)
    pictures = np.stack([np.asarray(photo(224, 224, rng)) for _ in range(CALIBRATION_IMAGES)])
    norms = [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(pictures, training=True)
    for layer, momentum in zip(norms, momenta, strict=True):
        layer.momentum = momentum


def build_repository(
    root: Path, *, seed: int = SEED, alpha: float = 1.0, classes: int = NUM_CLASSES
) -> Path:
    """A model repository under ``root`` serving version 1 of ``mobilenet_v3_small`` with a
    verified float LiteRT artifact; returns the version folder. Raises RuntimeError when
    the conversion does not reproduce the SavedModel (the bench must not measure it)."""
    from service.preprocessing import PreprocessSpec
    from service.publishing import publish_version
    from service.runtimes.conversion import convert_litert
    from service.training.evaluate import load_signature
    from service.training.export import warmup_records, write_saved_model, write_warmup

    net = build_keras(seed, alpha=alpha, classes=classes)
    spec = PreprocessSpec()
    labels = [f"class_{i:04d}" for i in range(classes)]
    repository = root / "repository"

    def write(tmp: Path) -> None:
        write_saved_model(net, spec, tmp)
        extra = tmp / "assets.extra"
        extra.mkdir()
        (extra / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
        write_warmup(extra / "tf_serving_warmup_requests", warmup_records(MODEL_NAME, spec))
        samples = np.random.default_rng(seed).integers(0, 256, (4, 224, 224, 3), np.uint8)
        litert = convert_litert(tmp, extra / "model.tflite", load_signature(tmp), samples)
        if not litert["verified"]:
            raise RuntimeError(
                f"LiteRT conversion of {MODEL_NAME} differs from the SavedModel by "
                f"{litert['max_abs_diff']:.3g} > {litert['tolerance']}: not measured"
            )
        card = {
            "schema_version": 1,
            "name": MODEL_NAME,
            "labels": labels,
            "preprocessing": {**spec.to_card(), "normalization": NORMALIZATION},
            "signatures": {SERVING_SIGNATURE: {}, BYTES_SIGNATURE: {}},
            "architecture": {
                "name": "keras.applications.MobileNetV3Small",
                "weights": None,
                "alpha": alpha,
                "num_classes": classes,
                "parameters": int(net.count_params()),
                "seed": seed,
            },
            "note": "random weights, built by `cnnserve bench` for throughput only; its "
            "labels mean nothing",
            "runtimes": {"tensorflow": {"signature": SERVING_SIGNATURE}, "litert": litert},
        }
        (extra / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")

    version_dir = publish_version(repository / MODEL_NAME, write)
    (repository / "models.config").write_text(
        "model_config_list {\n"
        f'  config {{ name: "{MODEL_NAME}" base_path: "/models/{MODEL_NAME}" '
        'model_platform: "tensorflow" model_version_policy { latest { num_versions: 1 } } }\n'
        "}\n"
    )
    return version_dir


def _gateway_top_k(url: str, image: bytes, k: int) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        f"{url}/v1/classify?top_k={k}",
        data=image,
        headers={"Content-Type": "image/jpeg"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    predictions: list[dict[str, Any]] = body["predictions"]
    return predictions


def check_answers(
    url: str, version_dir: Path, images: list[bytes], settings: Settings
) -> dict[str, Any]:
    """The gateway's top-5 for each of ``images`` against TensorFlow's SavedModel on the
    same preprocessed pixels: class ids in the same order (a swap only between classes
    whose TensorFlow scores tie to ``TIE_TOLERANCE``) and every score within
    ``ANSWER_TOLERANCE``. Raises RuntimeError otherwise."""
    from service.preprocessing import PreprocessSpec, preprocess_bytes
    from service.repository import read_card
    from service.training.evaluate import load_signature

    spec = PreprocessSpec.from_card(read_card(version_dir).get("preprocessing", {}))
    predict = load_signature(version_dir)
    max_diff, exact, problems = 0.0, 0, []
    for n, image in enumerate(images):
        pixels = preprocess_bytes(image, spec, max_pixels=settings.max_image_pixels)
        expected = np.asarray(predict(pixels[None]))[0]
        got = _gateway_top_k(url, image, TOP_K)
        ids = [int(p["class_id"]) for p in got]
        want = [int(i) for i in np.argsort(-expected, kind="stable")[:TOP_K]]
        exact += ids == want
        for rank, (p, w) in enumerate(zip(got, want, strict=True)):
            diff = abs(float(p["score"]) - float(expected[int(p["class_id"])]))
            tie = abs(float(expected[int(p["class_id"])]) - float(expected[w]))
            max_diff = max(max_diff, diff)
            if diff > ANSWER_TOLERANCE or tie > TIE_TOLERANCE:
                problems.append(
                    f"image {n} rank {rank + 1}: gateway class {p['class_id']} score "
                    f"{p['score']:.6f}, TensorFlow class {w} score {expected[w]:.6f}"
                )
    result = {
        "images": len(images),
        "top_k": TOP_K,
        "top5_identical": exact,
        "max_score_diff": max_diff,
        "tolerance": ANSWER_TOLERANCE,
        "ok": not problems,
    }
    if problems:
        raise RuntimeError(
            "the gateway's answers differ from TensorFlow's: " + "; ".join(problems[:5])
        )
    return result
