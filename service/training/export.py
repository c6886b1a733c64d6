"""Export: a trained model becomes a published version in the model repository.

The SavedModel, its LiteRT twin, labels, warmup records, evaluation and model card
are written and checked inside :func:`service.publishing.publish_version`, so the
version appears complete or not at all.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf
from PIL import Image

from service.contract import (
    BYTES_INPUT_NAME,
    BYTES_SIGNATURE,
    INPUT_NAME,
    OUTPUT_NAME,
    SERVING_SIGNATURE,
)
from service.preprocessing import PreprocessSpec
from service.proto_gen.tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
from service.publishing import publish_version
from service.runtimes.conversion import convert_litert as convert_litert  # re-export: lived here
from service.samples import SAMPLE_COUNT, SAMPLES_FOLDER, first_of_each_class, write_samples
from service.training.architectures import NORMALIZATION
from service.training.config import TrainConfig
from service.training.data import ImageSet
from service.training.evaluate import (
    evaluate_predictions,
    latency,
    load_signature,
    plot_confusion,
    plot_curves,
)
from service.training.graph_decode import decode_for_model
from service.training.train import TrainResult

log = logging.getLogger(__name__)


def write_saved_model(model: keras.Model, spec: PreprocessSpec, path: Path) -> None:
    """SavedModel with the uint8 image signature and an encoded-bytes signature."""
    shape = [None, spec.height, spec.width, 3]

    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        return {OUTPUT_NAME: model(image, training=False)}

    def decode_one(data: tf.Tensor) -> tf.Tensor:
        # Plain TF Serving clients sending files: TF's decoders approximate the gateway's
        # Pillow path (the card says so).
        return decode_for_model(data, spec)

    def serve_bytes(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        images = tf.map_fn(
            decode_one, image_bytes, fn_output_signature=tf.TensorSpec(shape[1:], tf.uint8)
        )
        return {OUTPUT_NAME: model(images, training=False)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        SERVING_SIGNATURE, serve, [tf.TensorSpec(shape, tf.uint8, name=INPUT_NAME)]
    )
    archive.add_endpoint(
        BYTES_SIGNATURE, serve_bytes, [tf.TensorSpec([None], tf.string, name=BYTES_INPUT_NAME)]
    )
    archive.write_out(str(path), verbose=False)


def warmup_records(model_name: str, spec: PreprocessSpec) -> list[bytes]:
    """PredictionLog records TF Serving (and our gateway) replay before serving."""
    records = []
    for batch in (1, 8):
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SERVING_SIGNATURE)
        )
        pixels = np.full((batch, spec.height, spec.width, 3), 128, dtype=np.uint8)
        request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(pixels))
        log_entry = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)
        )
        records.append(log_entry.SerializeToString())
    png = io.BytesIO()
    Image.new("RGB", (spec.width, spec.height), (128, 128, 128)).save(png, "PNG")
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=BYTES_SIGNATURE)
    )
    request.inputs[BYTES_INPUT_NAME].CopyFrom(tf.make_tensor_proto([png.getvalue()]))
    records.append(
        prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)
        ).SerializeToString()
    )
    return records


def demo_sample_images(
    test: ImageSet, spec: PreprocessSpec, count: int = SAMPLE_COUNT
) -> list[tuple[npt.NDArray[np.uint8], str, str]]:
    """The first test image of each of the first ``count`` classes met, as the model
    sees it, with its class: the demo page offered only blank warmup images for a model
    trained on a folder."""
    chosen = first_of_each_class(test.labels.tolist(), count)
    return [
        (test.model_input(i, spec), test.class_names[label], f"test split image {i}")
        for label, i in chosen.items()
    ]


def write_warmup(path: Path, records: list[bytes]) -> None:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("cnnserve", "tensorflow", "keras", "numpy", "pillow", "ai-edge-litert"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def build_card(
    result: TrainResult,
    cfg: TrainConfig,
    *,
    model_name: str,
    command: str,
    evaluation: dict[str, Any],
    litert: dict[str, Any],
) -> dict[str, Any]:
    spec = cfg.preprocess
    classes = result.splits.train.class_names
    run = cfg.as_run(len(classes)).to_card()
    history = result.history
    return {
        "schema_version": 1,
        "name": model_name,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "labels": classes,
        "signatures": {
            SERVING_SIGNATURE: {
                "inputs": {
                    INPUT_NAME: {"dtype": "uint8", "shape": [-1, spec.height, spec.width, 3]}
                },
                "outputs": {OUTPUT_NAME: {"dtype": "float32", "shape": [-1, len(classes)]}},
            },
            BYTES_SIGNATURE: {
                "inputs": {BYTES_INPUT_NAME: {"dtype": "string", "shape": [-1]}},
                "outputs": {OUTPUT_NAME: {"dtype": "float32", "shape": [-1, len(classes)]}},
                "note": "decodes with TF's decoders in the graph (EXIF orientation applied, "
                "transparency composited on white) and resizes with the card's method, "
                "antialiased: close to, not bit-equal with, the gateway's Pillow path; "
                "no TIFF (see docs/serving.md)",
            },
        },
        "preprocessing": {
            **spec.to_card(),
            "normalization": {**NORMALIZATION, "where": "inside the graph (first layer)"},
            "training_inputs": "every training and evaluation image went through "
            "service.preprocessing (the gateway's function); augmentation was applied to the "
            + (
                "source image before it"
                if result.splits.train.pixels is not None
                else "preprocessed 224x224 image"
            ),
        },
        "architecture": {
            **run["arch"],
            "parameters": int(result.model.count_params()),
        },
        "training": {
            **run,
            "seconds": round(result.seconds, 1),
            "epochs_run": len(history.get("loss", [])),
            "history": history,
            "overfitting_warnings": result.warnings,
            "run_id": result.run_id,
            "machine": {
                "cpus": os.cpu_count(),
                "processor": platform.machine(),
                "system": platform.platform(),
            },
        },
        "dataset": {"source": cfg.dataset, **result.splits.describe()},
        "evaluation": {"split": "test", **evaluation},
        "runtimes": {"tensorflow": {"signature": SERVING_SIGNATURE}, "litert": litert},
        "command": command,
        "library_versions": library_versions(),
    }


def publish_written(model_dir: Path, write: Callable[[Path], None]) -> Path:
    """:func:`publish_version`, with TensorFlow's failed writes (SavedModel, warmup
    records: its OpError, not OSError) raised as an OSError the CLI tells in one line, as
    it does Python's (a full disk was a traceback; the version stays unpublished)."""
    try:
        return publish_version(model_dir, write)
    except (tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError) as exc:
        # Its message is "<file>; <reason>", the file in the temp folder just removed.
        reason = exc.message.rpartition("; ")[2]
        full = isinstance(exc, tf.errors.ResourceExhaustedError)
        raise OSError(
            f"cannot write a version into {model_dir}: {reason}; "
            f"{'free space there' if full else 'allow writing there'} or choose another "
            "--repository"
        ) from exc


def publish(
    result: TrainResult,
    cfg: TrainConfig,
    *,
    repository: Path,
    model_name: str,
    command: str,
    latency_runs: int = 50,
    demo_samples: bool = True,
) -> Path:
    """Export, evaluate on the test split and publish the next version of ``model_name``;
    ``demo_samples``: a few test images go with it, for the demo page."""
    spec = cfg.preprocess
    classes = result.splits.train.class_names

    def write(tmp: Path) -> None:
        write_saved_model(result.model, spec, tmp)
        extra = tmp / "assets.extra"
        extra.mkdir()
        (extra / "labels.txt").write_text("".join(f"{name}\n" for name in classes))
        predict = load_signature(tmp)
        evaluation, _ = evaluate_predictions(predict, result.splits.test, spec)
        evaluation["latency_tensorflow"] = latency(predict, spec, latency_runs)
        samples = np.stack(
            [
                result.splits.test.model_input(i, spec)
                for i in range(min(8, len(result.splits.test)))
            ]
        )
        litert = convert_litert(tmp, extra / "model.tflite", predict, samples)
        plot_confusion(evaluation, extra / "confusion_matrix.png", f"{model_name} (test split)")
        plot_curves(result.history, extra / "training_curves.png", f"{model_name}: {cfg.arch.name}")
        write_warmup(extra / "tf_serving_warmup_requests", warmup_records(model_name, spec))
        if demo_samples and cfg.dataset != "fashion_mnist":  # those come from its IDX files
            write_samples(extra / SAMPLES_FOLDER, demo_sample_images(result.splits.test, spec))
        card = build_card(
            result,
            cfg,
            model_name=model_name,
            command=command,
            evaluation=evaluation,
            litert=litert,
        )
        (extra / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")

    version_dir = publish_written(repository / model_name, write)
    log.info("published %s", version_dir)
    return version_dir
