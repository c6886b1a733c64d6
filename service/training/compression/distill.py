"""Distill: a smaller student trained on a teacher version's softened outputs.

Hinton et al. (2015): the student minimises

    α · CE(y, p_s) + (1 - α) · T² · KL(softmax(log p_t / T) ‖ softmax(log p_s / T))

Our models end in softmax, and softmax(log p / T) equals softmax(logits / T), so the
softened distributions come from the probabilities both models already output. This is
the loss ``keras.distillation.Distiller`` computes from logits; written as a plain loss
it needs no logits head and the teacher can stay the published SavedModel (its
``serving_default`` signature runs inside the input pipeline, on the same batches the
student sees). The same student architecture is trained again with α = 1 (labels only,
same data, seed and steps), and both accuracies are reported side by side.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from service.contract import SERVING_SIGNATURE
from service.errors import DatasetError
from service.repository import load_card, version_dirs
from service.training.architectures import build
from service.training.compression.common import (
    Source,
    compare,
    float_artifact,
    publish_compressed,
    training_images,
)
from service.training.config import ArchConfig
from service.training.evaluate import evaluate_predictions
from service.training.export import write_saved_model
from service.training.pipeline import batches

log = logging.getLogger(__name__)

ARTIFACT = "model.tflite"
# The floor under probabilities before their log: float32's smallest normal number. A
# confident teacher has classes far below 1e-7 (38% of the default model's), and a floor
# there gave them one softened mass and the student no gradient on them.
EPSILON = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class DistillOptions:
    teacher_version: int | None = None  # default: the source version
    student_arch: str = "efficient_cnn"
    student_width: float = 0.5
    student_depth: int = 1
    temperature: float = 4.0
    alpha: float = 0.1
    epochs: int = 2
    batch_size: int = 64
    learning_rate: float = 2e-3
    limit: int = 0
    latency_runs: int = 50
    seed: int = 0


def distillation_loss(temperature: float, alpha: float) -> Any:
    """Loss over y_true = [label, teacher probabilities...] and the student's probabilities."""

    def loss(y_true: Any, y_pred: Any) -> Any:
        labels = ops.cast(y_true[:, 0], "int32")
        teacher = ops.clip(y_true[:, 1:], EPSILON, 1.0)
        student = ops.clip(y_pred, EPSILON, 1.0)
        hard = keras.losses.sparse_categorical_crossentropy(labels, y_pred)
        soft_teacher = ops.softmax(ops.log(teacher) / temperature, axis=-1)
        log_soft_student = ops.log_softmax(ops.log(student) / temperature, axis=-1)
        kl = ops.sum(
            soft_teacher * (ops.log(ops.clip(soft_teacher, EPSILON, 1.0)) - log_soft_student),
            axis=-1,
        )
        return alpha * hard + (1 - alpha) * temperature**2 * kl

    return loss


def _student(source: Source, options: DistillOptions) -> keras.Model:
    keras.utils.set_random_seed(options.seed)
    cfg = ArchConfig(
        name=options.student_arch,
        num_classes=len(source.class_names),
        width_multiplier=options.student_width,
        depth=options.student_depth,
    )
    return build(cfg)


def _fit(
    source: Source, options: DistillOptions, teacher_fn: Any, alpha: float
) -> tuple[keras.Model, dict[str, list[float]]]:
    train = training_images(source, options.limit)
    model = _student(source, options)
    model.compile(
        optimizer=keras.optimizers.Adam(options.learning_rate),
        loss=distillation_loss(options.temperature, alpha),
    )

    def with_teacher(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        soft = teacher_fn(image=x)["probabilities"]
        return x, tf.concat([tf.cast(y, tf.float32)[:, None], soft], axis=1)

    data = batches(train, source.spec, options.batch_size, shuffle_seed=options.seed).map(
        with_teacher
    )
    fit = model.fit(data, epochs=options.epochs, verbose=0, shuffle=False)
    return model, {k: [float(v) for v in vs] for k, vs in fit.history.items()}


def compress_distill(source: Source, options: DistillOptions, *, command: str) -> tuple[Path, str]:
    """Publish the next version; returns it and the printable summary of the effects."""
    versions = version_dirs(source.model_dir)
    teacher_version = source.version if options.teacher_version is None else options.teacher_version
    if teacher_version not in versions:
        raise DatasetError(f"no teacher version {teacher_version} in {source.model_dir}")
    teacher_card = load_card(versions[teacher_version])
    if teacher_version != source.version and teacher_card.get("labels") != source.class_names:
        raise DatasetError(
            f"teacher version {teacher_version} has other classes than version "
            f"{source.version} ({teacher_card.get('labels')} vs {source.class_names}): "
            "its outputs would teach the wrong labels"
        )
    teacher = tf.saved_model.load(str(versions[teacher_version]))
    teacher_fn = teacher.signatures[SERVING_SIGNATURE]
    log.info(
        "distilling %s version %d into %s (width %.2f)",
        source.model_dir.name,
        teacher_version,
        options.student_arch,
        options.student_width,
    )
    student, history = _fit(source, options, teacher_fn, options.alpha)
    baseline, baseline_history = _fit(source, options, teacher_fn, 1.0)

    def keras_predict(model: keras.Model) -> Any:
        return lambda x: np.asarray(model(x, training=False), dtype=np.float32)

    baseline_eval, _ = evaluate_predictions(keras_predict(baseline), source.test, source.spec)
    teacher_eval = None  # the source's figures below, when the source is the teacher
    if teacher_version != source.version:

        def teacher_predict(x: Any) -> Any:
            return teacher_fn(image=tf.constant(x))["probabilities"].numpy()

        teacher_eval, _ = evaluate_predictions(teacher_predict, source.test, source.spec)

    content, record = float_artifact(student, source)

    comparison = compare(
        source, content, "float32", method="distill", latency_runs=options.latency_runs
    )
    figures, summary = comparison.figures, comparison.summary
    summary.append(
        f"  student     {comparison.after.evaluation['accuracy']:.2%} with the teacher, "
        f"{baseline_eval['accuracy']:.2%} trained alone ({options.student_arch}, "
        f"{student.count_params():,} parameters vs the teacher's "
        f"{_count(teacher_card.get('architecture', {}).get('parameters'))})"
    )
    arch = {
        **asdict(
            ArchConfig(
                name=options.student_arch,
                num_classes=len(source.class_names),
                width_multiplier=options.student_width,
                depth=options.student_depth,
            )
        ),
        "parameters": int(student.count_params()),
    }
    training = {
        **source.card["training"],
        "distillation": {
            "teacher_version": teacher_version,
            "temperature": options.temperature,
            "alpha": options.alpha,
            "epochs": options.epochs,
            "batch_size": options.batch_size,
            "learning_rate": options.learning_rate,
            "training_images": len(training_images(source, options.limit)),
            "history": history,
        },
    }
    compression = {
        "method": "distill",
        "source_version": source.version,
        "teacher_version": teacher_version,
        "technique": "knowledge distillation (Hinton et al. 2015) on the teacher's "
        "temperature-softened probabilities plus the hard labels",
        "student_architecture": arch,
        "student_accuracy": comparison.after.evaluation["accuracy"],
        "student_without_teacher_accuracy": baseline_eval["accuracy"],
        "student_without_teacher_history": baseline_history,
        # The teacher's own, on the same test images (it was the source's: another model
        # when --teacher names another version).
        "teacher_accuracy": (teacher_eval or comparison.before.evaluation)["accuracy"],
        **figures,
    }
    version_dir = publish_compressed(
        source,
        write_model=lambda tmp: write_saved_model(student, source.spec, tmp),
        artifact_name=ARTIFACT,
        content=content,
        litert_record=record,
        compression=compression,
        measured=comparison.after,
        command=command,
        card_updates={"architecture": arch, "training": training},
    )
    return version_dir, "\n".join(summary)


def _count(value: object) -> str:
    """A parameter count as the student's is printed (30,778), or '?' when unknown."""
    return f"{value:,}" if isinstance(value, int) else "?"
