"""What every compression method shares: the source version, its data, measurement, and
publishing the result as the next version.

A method reads a published version (:class:`Source`), produces a LiteRT artifact (and,
for prune/distill, a new Keras model), and hands both to :func:`publish_compressed`,
which measures the effects on the runtime that serves each version (size, test accuracy,
throughput at batch 1 and 32) and publishes through
:func:`~service.training.export.publish_written`: a new version appears complete or not
at all, and the source version is never modified.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import numpy.typing as npt

from service.contract import INPUT_NAME, OUTPUT_NAME, SERVING_SIGNATURE
from service.errors import DatasetError, ExportError
from service.preprocessing import PreprocessSpec
from service.repository import version_dirs
from service.runtimes.card import saved_model_digest, variables_data_digest
from service.samples import SAMPLES_FOLDER
from service.training.architectures import build
from service.training.config import ArchConfig
from service.training.data import ImageSet, Splits
from service.training.evaluate import (
    card_splits,
    evaluate_predictions,
    litert_predict,
    load_signature,
    paired_latency,
)
from service.training.export import publish_written

log = logging.getLogger(__name__)

EXTRA = "assets.extra"


@dataclass
class Source:
    """A published version and the dataset splits its card records."""

    version_dir: Path
    version: int
    card: dict[str, Any]
    spec: PreprocessSpec
    splits: Splits
    test: ImageSet  # the test split, or its first --test-limit images

    @property
    def model_dir(self) -> Path:
        return self.version_dir.parent

    @property
    def class_names(self) -> list[str]:
        return list(self.card["labels"])

    def artifact(self) -> Path:
        """The LiteRT artifact the embedded runtime serves for this version."""
        record = self.card.get("runtimes", {}).get("litert", {})
        path = self.version_dir / EXTRA / str(record.get("file") or "model.tflite")
        if not path.is_file():
            raise DatasetError(f"{self.version_dir} ships no LiteRT artifact ({path.name})")
        return path

    def precision(self) -> str:
        return str(self.card.get("runtimes", {}).get("litert", {}).get("precision", "float32"))


def load_source(
    repository: Path,
    model: str,
    version: int | None,
    *,
    data_dir: Path | None = None,
    test_limit: int = 0,
) -> Source:
    versions = version_dirs(repository / model)
    if not versions:
        raise DatasetError(f"no published version of {model} in {repository}")
    number = version if version is not None else max(versions)
    if number not in versions:
        raise DatasetError(f"{model} has no version {number} (has {sorted(versions)})")
    version_dir = versions[number]
    card_path = version_dir / EXTRA / "model_card.json"
    try:
        card = json.loads(card_path.read_text())
        splits = card_splits(card, data_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetError(
            f"{version_dir}: no usable model card with training data: {exc}"
        ) from None
    test = splits.test.sample(test_limit, seed=0)
    spec = PreprocessSpec.from_card(card["preprocessing"])
    return Source(version_dir, number, card, spec, splits, test)


def training_images(source: Source, limit: int) -> ImageSet:
    return source.splits.train.sample(limit, seed=0)


def arch_config(card: dict[str, Any]) -> ArchConfig:
    recorded = card.get("architecture") or {}
    fields = set(ArchConfig.__dataclass_fields__)
    return ArchConfig(**{k: v for k, v in recorded.items() if k in fields})


def rebuild_keras(source: Source) -> keras.Model:
    """The source version as a Keras model: the card's architecture, rebuilt, with the
    SavedModel's weights copied in (matched by variable path, checked by shape and by
    reproducing the SavedModel's output)."""
    import tensorflow as tf

    model = build(arch_config(source.card))
    loaded = tf.saved_model.load(str(source.version_dir))
    saved = {v.name.split(":")[0]: v for v in loaded.variables}
    missing = []
    for weight in model.weights:
        match = saved.get(weight.path)
        if match is None or tuple(match.shape) != tuple(weight.shape):
            missing.append(weight.path)
            continue
        weight.assign(match.numpy())
    if missing:
        raise DatasetError(
            f"{source.version_dir}: the card's architecture does not match the SavedModel's "
            f"variables ({len(missing)} unmatched, e.g. {missing[:3]})"
        )
    x = np.stack([source.test.model_input(i, source.spec) for i in range(min(4, len(source.test)))])
    expected = loaded.signatures[SERVING_SIGNATURE](**{INPUT_NAME: tf.constant(x)})[
        OUTPUT_NAME
    ].numpy()
    got = np.asarray(model(x, training=False))
    if not np.allclose(got, expected, atol=1e-4):
        raise DatasetError(f"{source.version_dir}: rebuilt Keras model differs from the SavedModel")
    return model


def float_artifact(model: keras.Model, source: Source) -> tuple[bytes, dict[str, Any]]:
    """A retrained model's float LiteRT artifact, verified against its own SavedModel on
    test images (the same check export runs); returns it and its ``runtimes.litert``
    record (without ``file``)."""
    from service.runtimes.conversion import convert_litert
    from service.training.export import write_saved_model

    with tempfile.TemporaryDirectory(prefix="cnnserve-compress-") as tmp:
        saved, target = Path(tmp) / "saved_model", Path(tmp) / "model.tflite"
        write_saved_model(model, source.spec, saved)
        samples = np.stack(
            [source.test.model_input(i, source.spec) for i in range(min(8, len(source.test)))]
        )
        record = convert_litert(saved, target, load_signature(saved), samples)
        if not record["verified"]:
            raise ExportError(f"the LiteRT conversion did not reproduce the model: {record}")
        content = target.read_bytes()
    record.pop("file", None)
    return content, {**record, "precision": "float32"}


@dataclass
class Measurement:
    """One artifact measured on the test split (or its limited prefix)."""

    runtime: str
    precision: str
    bytes: int
    gzip_bytes: int
    evaluation: dict[str, Any]
    latency: dict[str, Any]
    probabilities: npt.NDArray[np.float32] = field(repr=False)

    def throughput(self, batch: int) -> float:
        return 1e3 / float(self.latency[f"batch_{batch}"]["per_image_ms"])

    def summary(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "precision": self.precision,
            "bytes": self.bytes,
            "gzip_bytes": self.gzip_bytes,
            "accuracy": self.evaluation["accuracy"],
            "mean_average_precision": self.evaluation.get("mean_average_precision"),
            "examples": self.evaluation["examples"],
            "images_per_s_batch_1": round(self.throughput(1), 1),
            "images_per_s_batch_32": round(self.throughput(32), 1),
        }


def measure_pair(
    before: tuple[bytes, str],
    after: tuple[bytes, str],
    source: Source,
    *,
    latency_runs: int,
    threads: int = 1,
) -> tuple[Measurement, Measurement]:
    """Both artifacts (content, precision) on the test images, then timed together."""
    predicts = [litert_predict(content, threads) for content, _ in (before, after)]
    measured = []
    for (content, precision), predict in zip((before, after), predicts, strict=True):
        evaluation, probabilities = evaluate_predictions(predict, source.test, source.spec)
        measured.append(
            Measurement(
                runtime="litert",
                precision=precision,
                bytes=len(content),
                gzip_bytes=len(gzip.compress(content, 9)),
                evaluation=evaluation,
                latency={},
                probabilities=probabilities,
            )
        )
    for measurement, timing in zip(
        measured, paired_latency(predicts, source.spec, latency_runs), strict=True
    ):
        measurement.latency = timing
    return measured[0], measured[1]


def effects(before: Measurement, after: Measurement) -> dict[str, Any]:
    """The three figures every method reports: size, accuracy and throughput deltas."""
    agreement = float(
        np.mean(np.argmax(before.probabilities, 1) == np.argmax(after.probabilities, 1))
    )
    return {
        "size_ratio": round(before.bytes / after.bytes, 3),
        "gzip_size_ratio": round(before.gzip_bytes / after.gzip_bytes, 3),
        "accuracy_delta": after.evaluation["accuracy"] - before.evaluation["accuracy"],
        "top1_agreement": agreement,
        "throughput_ratio_batch_1": round(after.throughput(1) / before.throughput(1), 3),
        "throughput_ratio_batch_32": round(after.throughput(32) / before.throughput(32), 3),
        "test_examples": after.evaluation["examples"],
        "before": before.summary(),
        "after": after.summary(),
    }


@dataclass
class Comparison:
    """The source's served artifact and the new one, measured alike, and their effects."""

    before: Measurement
    after: Measurement
    figures: dict[str, Any]
    summary: list[str]


def compare(
    source: Source, content: bytes, precision: str, *, method: str, latency_runs: int
) -> Comparison:
    before, after = measure_pair(
        (source.artifact().read_bytes(), source.precision()),
        (content, precision),
        source,
        latency_runs=latency_runs,
    )
    figures = effects(before, after)
    return Comparison(before, after, figures, [format_effects(method, figures)])


def format_effects(method: str, figures: dict[str, Any]) -> str:
    b, a = figures["before"], figures["after"]
    return "\n".join(
        [
            f"{method}: {b['runtime']}/{b['precision']} -> {a['runtime']}/{a['precision']} "
            f"on {figures['test_examples']} test images",
            f"  size        {b['bytes']:,} -> {a['bytes']:,} bytes "
            f"({figures['size_ratio']:.2f}x smaller; gzip {figures['gzip_size_ratio']:.2f}x)",
            f"  accuracy    {b['accuracy']:.2%} -> {a['accuracy']:.2%} "
            f"({figures['accuracy_delta'] * 100:+.2f} points; "
            f"top-1 agreement {figures['top1_agreement']:.2%})",
            f"  batch 1     {b['images_per_s_batch_1']:.0f} -> {a['images_per_s_batch_1']:.0f} "
            f"images/s ({figures['throughput_ratio_batch_1']:.2f}x)",
            f"  batch 32    {b['images_per_s_batch_32']:.0f} -> "
            f"{a['images_per_s_batch_32']:.0f} images/s "
            f"({figures['throughput_ratio_batch_32']:.2f}x)",
        ]
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def copy_saved_model(source: Path, target: Path) -> None:
    """The source version's SavedModel files (TF Serving loads these), not its extras."""
    for path in source.iterdir():
        if path.name == EXTRA:
            continue
        if path.is_dir():
            shutil.copytree(path, target / path.name)
        else:
            shutil.copy2(path, target / path.name)


def publish_compressed(
    source: Source,
    *,
    write_model: Callable[[Path], None],
    artifact_name: str,
    content: bytes,
    litert_record: dict[str, Any],
    compression: dict[str, Any],
    measured: Measurement,
    command: str,
    card_updates: dict[str, Any] | None = None,
) -> Path:
    """Publish the next version: ``write_model(tmp)`` writes the SavedModel, the source's
    labels and warmup records are copied, the artifact and the card are added."""

    def write(tmp: Path) -> None:
        write_model(tmp)
        extra = tmp / EXTRA
        extra.mkdir(exist_ok=True)
        for name in ("labels.txt", "tf_serving_warmup_requests"):
            src = source.version_dir / EXTRA / name
            if src.is_file():
                shutil.copy2(src, extra / name)
        if (samples := source.version_dir / EXTRA / SAMPLES_FOLDER).is_dir():
            shutil.copytree(samples, extra / SAMPLES_FOLDER)  # the demo page's, as before
        (extra / artifact_name).write_bytes(content)
        card = {
            **source.card,
            **(card_updates or {}),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "evaluation": {
                "split": "test",
                **measured.evaluation,
                "latency_litert": measured.latency,
            },
            "runtimes": {
                "tensorflow": {"signature": SERVING_SIGNATURE},
                "litert": {
                    "file": artifact_name,
                    "bytes": len(content),
                    "sha256": sha256(content),
                    **litert_record,
                    # The SavedModel written above (a second export of one Keras model
                    # need not be byte-identical to the one converted).
                    "saved_model_sha256": saved_model_digest(tmp),
                    "variables_data_sha256": variables_data_digest(tmp),
                },
            },
            "compression": compression,
            "command": command,
        }
        (extra / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")

    version_dir = publish_written(source.model_dir, write)
    log.info("published %s", version_dir)
    return version_dir
