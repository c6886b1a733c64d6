"""Prune: magnitude pruning to a target sparsity on a polynomial schedule, with fine-tuning.

Written with Keras 3 itself (tensorflow-model-optimization needs Keras 2): a callback
keeps one 0/1 mask per prunable kernel (Conv2D, DepthwiseConv2D, Dense). Every
``frequency`` steps it raises each kernel's sparsity along Zhu & Gupta's schedule

    s_t = s_f + (s_i - s_f) · (1 - (t - t_0) / (t_end - t_0))³

masking the smallest-magnitude weights of that kernel, and after every step it multiplies
the kernels by their masks, so pruned weights stay at zero while the rest fine-tune.

What it buys, honestly: zeros compress (the gzip'd artifact shrinks), but the float
LiteRT artifact keeps dense tensors of the same byte size, and XNNPACK's sparse kernels
apply only to specific float 1×1-convolution layouts (and need the converter's sparsity
encoding), so CPU inference is not expected to get faster; the card records what was
measured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import numpy.typing as npt

from service.training.compression.common import (
    Source,
    compare,
    float_artifact,
    publish_compressed,
    rebuild_keras,
    training_images,
)
from service.training.export import write_saved_model
from service.training.pipeline import batches

log = logging.getLogger(__name__)

ARTIFACT = "model.tflite"
PRUNABLE = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


@dataclass(frozen=True)
class PruneOptions:
    target_sparsity: float = 0.5
    initial_sparsity: float = 0.0
    epochs: int = 2
    batch_size: int = 64
    learning_rate: float = 1e-4
    end_fraction: float = 0.7  # the schedule reaches the target at 70% of the steps
    limit: int = 0
    latency_runs: int = 50
    seed: int = 0


def polynomial_sparsity(
    step: int, *, initial: float, final: float, begin: int, end: int, power: int = 3
) -> float:
    """Zhu & Gupta (2017)'s schedule: fast at first, flattening out at ``final``."""
    if step <= begin:
        return initial
    if step >= end:
        return final
    progress = (step - begin) / (end - begin)
    return final + (initial - final) * (1 - progress) ** power


def prunable_kernels(model: keras.Model) -> list[Any]:
    """The kernels (not biases, not BatchNorm) of every conv and dense layer but the
    classifier: its few weights decide every class, so pruning them costs most."""
    return [layer.kernel for layer in model.layers[:-1] if isinstance(layer, PRUNABLE)]


def magnitude_mask(values: npt.NDArray[Any], sparsity: float) -> npt.NDArray[np.float32]:
    """1 for the weights to keep: all but the ``sparsity`` fraction smallest |w| (ties at
    the threshold go too, so the sparsity reached is at least the one asked for)."""
    count = round(sparsity * values.size)
    if count <= 0:
        return np.ones(values.shape, np.float32)
    magnitude = np.abs(values)
    threshold = np.partition(magnitude.ravel(), count - 1)[count - 1]
    mask: npt.NDArray[np.float32] = (magnitude > threshold).astype(np.float32)
    return mask


class MagnitudePruning(keras.callbacks.Callback):  # type: ignore[misc]
    """Masks the smallest weights of each kernel on a polynomial sparsity schedule."""

    def __init__(
        self, kernels: list[Any], *, initial: float, final: float, end_step: int, frequency: int
    ) -> None:
        super().__init__()
        self.kernels = kernels
        self.initial, self.final = initial, final
        self.end_step, self.frequency = max(1, end_step), max(1, frequency)
        self.step = 0
        self.sparsity = initial
        self.masks = [np.ones(tuple(k.shape), dtype="float32") for k in kernels]

    def _update_masks(self) -> None:
        self.sparsity = polynomial_sparsity(
            self.step, initial=self.initial, final=self.final, begin=0, end=self.end_step
        )
        for i, kernel in enumerate(self.kernels):
            self.masks[i] = magnitude_mask(keras.ops.convert_to_numpy(kernel), self.sparsity)

    def _apply(self) -> None:
        for kernel, mask in zip(self.kernels, self.masks, strict=True):
            kernel.assign(keras.ops.convert_to_numpy(kernel) * mask)

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.step % self.frequency == 0 or self.step == self.end_step:
            self._update_masks()
            self._apply()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.step += 1
        self._apply()

    def finish(self) -> None:
        """The target sparsity exactly, whatever the number of steps run."""
        self.step = self.end_step
        self._update_masks()
        self._apply()


def sparsity_of(kernels: list[Any]) -> float:
    values = [keras.ops.convert_to_numpy(k) for k in kernels]
    total = sum(v.size for v in values)
    return float(sum(int(np.sum(v == 0)) for v in values) / max(1, total))


def compress_prune(source: Source, options: PruneOptions, *, command: str) -> tuple[Path, str]:
    """Publish the next version; returns it and the printable summary of the effects."""
    keras.utils.set_random_seed(options.seed)
    model = rebuild_keras(source)
    kernels = prunable_kernels(model)
    train = training_images(source, options.limit)
    steps = max(1, -(-len(train) // options.batch_size)) * options.epochs
    pruning = MagnitudePruning(
        kernels,
        initial=options.initial_sparsity,
        final=options.target_sparsity,
        end_step=int(steps * options.end_fraction),
        frequency=max(1, steps // 20),
    )
    model.compile(
        optimizer=keras.optimizers.Adam(options.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    data = batches(train, source.spec, options.batch_size, shuffle_seed=options.seed)
    log.info(
        "pruning %s to %.0f%% over %d steps on %d images",
        source.version_dir,
        options.target_sparsity * 100,
        steps,
        len(train),
    )
    fit = model.fit(data, epochs=options.epochs, callbacks=[pruning], verbose=0, shuffle=False)
    pruning.finish()
    sparsity = sparsity_of(kernels)
    params = sum(int(np.prod(k.shape)) for k in kernels)

    content, record = float_artifact(model, source)

    comparison = compare(
        source, content, "float32", method="prune", latency_runs=options.latency_runs
    )
    figures, summary = comparison.figures, comparison.summary
    summary.append(
        f"  sparsity    {sparsity:.1%} of {params:,} prunable weights are zero "
        f"({int(sparsity * params):,} fewer non-zero parameters)"
    )
    compression = {
        "method": "prune",
        "source_version": source.version,
        "technique": "magnitude pruning per kernel, polynomial schedule (power 3), "
        "fine-tuned with the masks applied after every step (Keras 3 callback)",
        "target_sparsity": options.target_sparsity,
        "sparsity": sparsity,
        "prunable_parameters": params,
        "zeroed_parameters": round(sparsity * params),
        "fine_tuning": {
            "epochs": options.epochs,
            "batch_size": options.batch_size,
            "learning_rate": options.learning_rate,
            "training_images": len(train),
            "steps": steps,
            "history": {k: [float(v) for v in vs] for k, vs in fit.history.items()},
        },
        "speed_note": "the float LiteRT artifact stores dense tensors: zeros shrink the gzip'd "
        "size, not the file, and XNNPACK's sparse kernels apply only to specific float 1x1-conv "
        "layouts, so throughput is not expected to improve; the figures are measured",
        **figures,
    }
    version_dir = publish_compressed(
        source,
        write_model=lambda tmp: write_saved_model(model, source.spec, tmp),
        artifact_name=ARTIFACT,
        content=content,
        litert_record=record,
        compression=compression,
        measured=comparison.after,
        command=command,
    )
    return version_dir, "\n".join(summary)
