"""What every runtime derives the same way: the card, the signature's shape, the batch.

Both runtimes describe a model by the tensors of its ``serving_default`` signature
(TensorFlow from the SavedModel, LiteRT from the .tflite file). Picking the image input
and the output, reading the normalization a float input expects, and checking and
converting a client batch live here once, so the two runtimes cannot drift apart.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.contract import OUTPUT_NAME, SERVING_SIGNATURE
from service.errors import InvalidRequest, ModelLoadError
from service.runtimes.base import Batch, InputSpec, ModelInfo

log = logging.getLogger(__name__)

PREFERRED_OUTPUT = OUTPUT_NAME
# A float image input with no card saying otherwise gets [0, 1] pixels, the most common
# convention of Keras applications and TF Hub image models.
DEFAULT_SCALE = 1 / 255
IMAGE_DTYPES = ("uint8", "float32")


@dataclass(frozen=True)
class TensorDesc:
    """One signature tensor: dtype name and shape with None for unknown dimensions."""

    dtype: str
    shape: tuple[int | None, ...]


def card_normalization(card: Mapping[str, Any] | None) -> tuple[float, float]:
    """(scale, offset) a float input expects: the card's, else [0, 1]."""
    norm = ((card or {}).get("preprocessing") or {}).get("normalization") or {}
    try:
        return float(norm["scale"]), float(norm["offset"])
    except (KeyError, TypeError, ValueError):
        return DEFAULT_SCALE, 0.0


def verified_litert(version_dir: Path, card: Mapping[str, Any] | None) -> Path | None:
    """The exported .tflite when the card records that export verified it, else None."""
    record = ((card or {}).get("runtimes") or {}).get("litert") or {}
    if record.get("verified") is not True:
        return None
    path = version_dir / "assets.extra" / str(record.get("file") or "model.tflite")
    return path if path.is_file() else None


def _pick_output(outputs: Mapping[str, TensorDesc], where: Path) -> str:
    if PREFERRED_OUTPUT in outputs:
        return PREFERRED_OUTPUT
    if len(outputs) == 1:
        return next(iter(outputs))
    raise ModelLoadError(
        f"{where}: signature {SERVING_SIGNATURE} has outputs {sorted(outputs)}; "
        f"expected {PREFERRED_OUTPUT!r} or a single output"
    )


def describe(
    inputs: Mapping[str, TensorDesc],
    outputs: Mapping[str, TensorDesc],
    card: Mapping[str, Any] | None,
    where: Path,
) -> ModelInfo:
    """ModelInfo of a signature with one [N,H,W,3] uint8/float32 input and [N,C] output.

    Any model of that shape is servable, not only ours; anything else is refused with a
    message that says what was found.
    """
    if len(inputs) != 1:
        raise ModelLoadError(
            f"{where}: signature {SERVING_SIGNATURE} has inputs {sorted(inputs)}; "
            "expected one image"
        )
    input_name, image = next(iter(inputs.items()))
    shape = image.shape
    if (
        image.dtype not in IMAGE_DTYPES
        or len(shape) != 4
        or shape[3] != 3
        or shape[1] is None
        or shape[2] is None
    ):
        raise ModelLoadError(
            f"{where}: input {input_name!r} is {image.dtype} {list(shape)}; expected "
            "uint8 or float32 [N, height, width, 3] with height and width known"
        )
    output_name = _pick_output(outputs, where)
    out = outputs[output_name]
    if len(out.shape) != 2 or out.shape[1] is None:
        raise ModelLoadError(
            f"{where}: output {output_name!r} has shape {list(out.shape)}; "
            "expected [N, num_classes]"
        )
    scale, offset = card_normalization(card) if image.dtype == "float32" else (1.0, 0.0)
    spec = InputSpec(height=shape[1], width=shape[2], dtype=image.dtype, scale=scale, offset=offset)
    return ModelInfo(
        input=spec,
        num_classes=out.shape[1],
        input_name=input_name,
        output_name=output_name,
        signature_name=SERVING_SIGNATURE,
    )


def to_model_input(batch: Batch, spec: InputSpec) -> Batch:
    """Check a client batch and convert it to what the model takes.

    uint8 pixels are always accepted (the gateway's preprocessing yields uint8) and
    scaled for float models; a float32 batch is passed through to a float model as
    already-normalized input, which is what the base contract's "input dtype" means.
    """
    if not isinstance(batch, np.ndarray):
        raise InvalidRequest(f"expected a numpy array batch, got {type(batch).__name__}")
    expected = (spec.height, spec.width, 3)
    if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
        raise InvalidRequest(
            f"expected a batch of shape [N, {spec.height}, {spec.width}, 3], "
            f"got {list(batch.shape)}"
        )
    if batch.dtype == np.uint8:
        if spec.dtype == "uint8":
            return np.ascontiguousarray(batch)
        x = batch.astype(np.float32)
        x *= np.float32(spec.scale)  # in place: one float copy of the batch, not three
        x += np.float32(spec.offset)
        return x
    if batch.dtype == np.float32 and spec.dtype == "float32":
        return np.ascontiguousarray(batch)
    raise InvalidRequest(f"expected uint8 pixels, got dtype {batch.dtype}")
