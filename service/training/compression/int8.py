"""INT8: post-training full-integer quantization of a published version.

``TFLiteConverter.from_saved_model`` with ``TFLITE_BUILTINS_INT8`` only, calibrated on a
representative dataset of training-split images made by :mod:`service.preprocessing`
(the gateway's function), so the activation ranges are those of served images. The
input stays uint8 pixels (the graph's first op casts them) and the output float32
probabilities, so the gateway and the signature do not change.

The converter leaks memory on every call in TF 2.21, so conversion runs in a child
process (``python -m service.training.compression.int8 SAVED_MODEL SAMPLES.npy OUT``).

A quantized artifact cannot reproduce the float model to 1e-4, so it is verified by
what it is for: its top-1 agreement with the float model and its accuracy on the test
split, both measured here and recorded with the thresholds in the card. The serving
side (:func:`service.runtimes.card.verified_litert`) re-checks those figures against the
thresholds and the artifact's sha256 and refuses the version when they do not hold.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.contract import SERVING_SIGNATURE
from service.errors import ExportError
from service.runtimes.card import MAX_ACCURACY_DROP, MIN_TOP1_AGREEMENT
from service.training.compression.common import (
    Source,
    compare,
    copy_saved_model,
    publish_compressed,
)

log = logging.getLogger(__name__)

ARTIFACT = "model_int8.tflite"


@dataclass(frozen=True)
class Int8Options:
    representative_samples: int = 200
    min_top1_agreement: float = MIN_TOP1_AGREEMENT
    max_accuracy_drop: float = MAX_ACCURACY_DROP
    latency_runs: int = 50
    seed: int = 0


def representative_images(source: Source, count: int, seed: int) -> npt.NDArray[np.uint8]:
    """``count`` training images, drawn at random (seeded), in model-input form."""
    train = source.splits.train
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(train), size=min(count, len(train)), replace=False)
    return np.stack([train.model_input(int(i), source.spec) for i in sorted(picks)])


def _convert(saved_model: str, samples_path: str, out_path: str) -> None:
    """The child process's work: quantize and write the flatbuffer."""
    import tensorflow as tf

    samples = np.load(samples_path)

    def representative() -> Any:
        for x in samples:
            yield {"image": x[None]}

    converter = tf.lite.TFLiteConverter.from_saved_model(
        saved_model, signature_keys=[SERVING_SIGNATURE]
    )
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.float32
    Path(out_path).write_bytes(converter.convert())


def convert_int8(saved_model: Path, samples: npt.NDArray[np.uint8]) -> bytes:
    """The quantized flatbuffer, converted in a child process."""
    with tempfile.TemporaryDirectory(prefix="cnnserve-int8-") as tmp:
        samples_path, out_path = Path(tmp) / "samples.npy", Path(tmp) / ARTIFACT
        np.save(samples_path, samples)
        done = subprocess.run(
            [sys.executable, "-m", __name__, str(saved_model), str(samples_path), str(out_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not out_path.is_file():
            # The child's last line says why (its exception); the rest of its traceback
            # is for --verbose, not for the one line a failure gets.
            log.debug("int8 conversion's output:\n%s", done.stderr)
            lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            why = lines[-1] if lines else f"exit status {done.returncode}"
            raise ExportError(f"int8 conversion of {saved_model} failed: {why}")
        return out_path.read_bytes()


def compress_int8(source: Source, options: Int8Options, *, command: str) -> tuple[Path, str]:
    """Publish the next version; returns it and the printable summary of the effects."""
    samples = representative_images(source, options.representative_samples, options.seed)
    log.info("quantizing %s with %d representative images", source.version_dir, len(samples))
    content = convert_int8(source.version_dir, samples)
    comparison = compare(source, content, "int8", method="int8", latency_runs=options.latency_runs)
    figures, summary = comparison.figures, comparison.summary
    thresholds = {
        "min_top1_agreement": options.min_top1_agreement,
        "max_accuracy_drop": options.max_accuracy_drop,
    }
    passed = (
        figures["top1_agreement"] >= options.min_top1_agreement
        and figures["accuracy_delta"] >= -options.max_accuracy_drop
    )
    if not passed:
        raise ExportError(
            f"int8 artifact misses its thresholds (agreement {figures['top1_agreement']:.4f}, "
            f"accuracy delta {figures['accuracy_delta']:+.4f}; need {thresholds}); "
            "nothing published"
        )
    record = {
        "precision": "int8",
        "verified": True,
        "verification": "top-1 agreement with the float SavedModel and test accuracy, "
        "measured at compression on the examples below (a quantized artifact cannot match "
        "to 1e-4)",
        "top1_agreement": figures["top1_agreement"],
        "accuracy_delta": figures["accuracy_delta"],
        "examples": figures["test_examples"],
        "thresholds": thresholds,
    }
    compression = {
        "method": "int8",
        "source_version": source.version,
        "technique": "post-training full-integer quantization (TFLITE_BUILTINS_INT8), "
        "uint8 input, float32 output",
        "representative_samples": len(samples),
        "representative_split": "train (seeded random draw, service.preprocessing)",
        "saved_model": "the float SavedModel of the source version, unchanged "
        "(what TF Serving loads)",
        **figures,
    }
    version_dir = publish_compressed(
        source,
        write_model=lambda tmp: copy_saved_model(source.version_dir, tmp),
        artifact_name=ARTIFACT,
        content=content,
        litert_record=record,
        compression=compression,
        measured=comparison.after,
        command=command,
    )

    return version_dir, "\n".join(summary)


if __name__ == "__main__":
    _convert(*sys.argv[1:4])
