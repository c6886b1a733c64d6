"""What every runtime derives the same way: the card, the signature's shape, the batch.

Both runtimes describe a model by the tensors of its ``serving_default`` signature
(TensorFlow from the SavedModel, LiteRT from the .tflite file). Picking the image input
and the output, reading the normalization a float input expects, and checking and
converting a client batch live here once, so the two runtimes cannot drift apart.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.contract import OUTPUT_NAME, SERVING_SIGNATURE
from service.errors import InvalidRequest, ModelLoadError
from service.runtimes.base import Batch, InputSpec, ModelInfo
from service.tfserving_proto import dtype_name, tensor_dims

log = logging.getLogger(__name__)

PREFERRED_OUTPUT = OUTPUT_NAME
# A float image input with no card saying otherwise gets [0, 1] pixels, the most common
# convention of Keras applications and TF Hub image models.
DEFAULT_SCALE = 1 / 255
IMAGE_DTYPES = ("uint8", "float32")
# A quantized artifact is judged by what it is for, not by the float tolerance: its top-1
# agreement with the float model and its test accuracy, measured when it was made. These
# are the defaults `cnnserve compress` records; the card's own thresholds are what count.
MIN_TOP1_AGREEMENT = 0.98
MAX_ACCURACY_DROP = 0.01
FLOAT_PRECISION = "float32"


@dataclass(frozen=True)
class TensorDesc:
    """One signature tensor: dtype name and shape with None for unknown dimensions."""

    dtype: str
    shape: tuple[int | None, ...]


def signature_tensors(
    signature: Any,
) -> tuple[dict[str, TensorDesc], dict[str, TensorDesc]]:
    """The inputs and outputs of a SignatureDef proto as TensorDescs."""

    def descs(infos: Any) -> dict[str, TensorDesc]:
        return {n: TensorDesc(dtype_name(t.dtype), tensor_dims(t)) for n, t in infos.items()}

    return descs(signature.inputs), descs(signature.outputs)


def twin_mismatch(saved: ModelInfo, artifact: ModelInfo) -> str | None:
    """How an artifact's signature differs from its SavedModel's (input dtype and size,
    class count), or None when they match."""
    a, b = saved.input, artifact.input
    mine = (a.dtype, a.height, a.width, saved.num_classes)
    theirs = (b.dtype, b.height, b.width, artifact.num_classes)
    if mine == theirs:
        return None
    return (
        f"the LiteRT artifact takes {b.dtype} {b.height}x{b.width} and gives "
        f"{artifact.num_classes} classes, the SavedModel beside it {a.dtype} "
        f"{a.height}x{a.width} and {saved.num_classes}: not its twin"
    )


def card_normalization(card: Mapping[str, Any] | None) -> tuple[float, float]:
    """(scale, offset) a float input expects: the card's, else [0, 1]."""
    norm = ((card or {}).get("preprocessing") or {}).get("normalization") or {}
    try:
        return float(norm["scale"]), float(norm["offset"])
    except (KeyError, TypeError, ValueError):
        return DEFAULT_SCALE, 0.0


def litert_record(card: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The card's ``runtimes.litert`` record ({} when absent)."""
    record = ((card or {}).get("runtimes") or {}).get("litert") or {}
    return record if isinstance(record, Mapping) else {}


def artifact_precision(card: Mapping[str, Any] | None) -> str:
    """``float32``, or what the card says the shipped artifact was quantized to."""
    return str(litert_record(card).get("precision") or FLOAT_PRECISION)


def saved_model_digest(version_dir: Path) -> str:
    """sha256 over saved_model.pb and the variables index (which holds a checksum of
    every weight): the SavedModel an artifact was made from, in a few reads of small
    files."""
    digest = hashlib.sha256()
    for name in ("saved_model.pb", "variables/variables.index"):
        path = version_dir / name
        digest.update(name.encode() + b"\0")
        if path.is_file():  # a SavedModel without variables has no index
            digest.update(path.read_bytes())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of one file, read in blocks (an artifact or a weights shard, megabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def variables_data_digest(version_dir: Path) -> str:
    """sha256 over the variables data shards (names and bytes, in name order).

    saved_model_digest stops at the index: a truncated or overwritten shard keeps it, and
    the LiteRT runtime never reads the shards, so only this shows the damage. The default
    model's one shard is ~2 MB: a few milliseconds per load.
    """
    digest = hashlib.sha256()
    for path in sorted((version_dir / "variables").glob("variables.data-*")):
        digest.update(path.name.encode() + b"\0" + file_digest(path).encode())
    return digest.hexdigest()


def foreign_artifact(record: Mapping[str, Any], version_dir: Path) -> str | None:
    """Why the shipped artifact is not this SavedModel's twin (the card records whose it
    is), or None. A version folder whose SavedModel was replaced kept serving the old
    weights from the old artifact."""
    recorded = record.get("saved_model_sha256")
    if recorded is None:  # cards from before the record: the load's shape check stands
        return None
    if recorded != saved_model_digest(version_dir):
        return "the LiteRT artifact was made from another SavedModel (saved_model_sha256 differs)"
    return None


def damaged_artifact(record: Mapping[str, Any], path: Path) -> str | None:
    """Why the artifact is not the file export verified, or None: its recorded sha256
    differs, or (cards from before that record) its size, which only shows truncation."""
    recorded = record.get("sha256")
    if isinstance(recorded, str):
        if file_digest(path) != recorded:
            return f"{path.name} is not the artifact export verified (sha256 differs)"
    elif isinstance(record.get("bytes"), int):
        size = path.stat().st_size
        if size != record["bytes"]:
            return f"{path.name} is {size} bytes, export wrote {record['bytes']}"
    return None


def damaged_variables(record: Mapping[str, Any], version_dir: Path) -> str | None:
    """Why the variables data shards are not the exported ones, or None (also when the
    card predates the record). The graph and index match here (foreign_artifact), so a
    difference is damage, not another model: the version is refused, not converted."""
    recorded = record.get("variables_data_sha256")
    if isinstance(recorded, str) and recorded != variables_data_digest(version_dir):
        return (
            "the variables data shards are not the ones exported (variables_data_sha256 "
            "differs): truncated or damaged"
        )
    return None


def verified_litert(version_dir: Path, card: Mapping[str, Any] | None) -> Path | None:
    """The exported .tflite when the card records that export verified it, else None.

    A quantized artifact (``precision`` other than float32) is accepted only when its
    recorded, measured top-1 agreement and accuracy delta meet the thresholds the card
    states and the file is the one measured (sha256); otherwise the version is refused
    with ModelLoadError, never served from a fallback that would pose as it. A float one
    whose file or weights differ from what the card records (damaged_*) is refused
    too: its answers would be garbage (NaN), and a damaged copy is the operator's to fix.
    """
    record = litert_record(card)
    path = _artifact_path(version_dir, record)
    foreign = foreign_artifact(record, version_dir)
    if artifact_precision(card) != FLOAT_PRECISION:
        # quantized_refusal checks the artifact's sha256 already.
        refusal = (
            foreign or quantized_refusal(record, path) or damaged_variables(record, version_dir)
        )
        if refusal is not None:
            raise ModelLoadError(f"{version_dir}: {refusal}; refusing to serve it")
        return path
    if record.get("verified") is not True or not path.is_file():
        return None
    if foreign is not None:  # converted afresh from the SavedModel there (stale_artifact)
        return None
    damage = damaged_artifact(record, path) or damaged_variables(record, version_dir)
    if damage is not None:
        raise ModelLoadError(f"{version_dir}: {damage}; refusing to serve it")
    return path


def stale_artifact(version_dir: Path, card: Mapping[str, Any] | None) -> str | None:
    """Why the float artifact export verified is not served: the SavedModel beside it is
    another (:func:`foreign_artifact`), so :func:`verified_litert` passes it over. Said
    by the loader once the version has loaded (service.loading): a broken SavedModel
    also differs from the record, and its load error is the one line to read, not a
    warning first that its artifact "was made from another SavedModel"."""
    record = litert_record(card)
    if artifact_precision(card) != FLOAT_PRECISION or record.get("verified") is not True:
        return None
    if not _artifact_path(version_dir, record).is_file():
        return None
    return foreign_artifact(record, version_dir)


def _artifact_path(version_dir: Path, record: Mapping[str, Any]) -> Path:
    return version_dir / "assets.extra" / str(record.get("file") or "model.tflite")


def quantized_refusal(record: Mapping[str, Any], path: Path) -> str | None:
    """Why a quantized artifact must not be served, or None when its figures hold."""
    precision = record.get("precision")
    if not path.is_file():
        return f"the {precision} artifact {path.name} is missing"
    recorded = record.get("sha256")
    if not isinstance(recorded, str) or hashlib.sha256(path.read_bytes()).hexdigest() != recorded:
        return f"{path.name} is not the {precision} artifact that was measured (sha256 differs)"
    thresholds = record.get("thresholds") or {}
    try:
        agreement = float(record["top1_agreement"])
        delta = float(record["accuracy_delta"])
        min_agreement = float(thresholds["min_top1_agreement"])
        max_drop = float(thresholds["max_accuracy_drop"])
    except (KeyError, TypeError, ValueError):
        return f"the card records no measured agreement, accuracy and thresholds for {path.name}"
    if agreement < min_agreement:
        return (
            f"{precision} artifact agrees with the float model on {agreement:.2%} of "
            f"top-1 predictions < {min_agreement:.2%} the card requires"
        )
    if delta < -max_drop:
        return (
            f"{precision} artifact loses {-delta:.2%} test accuracy > {max_drop:.2%} "
            "the card allows"
        )
    return None


def _pick_output(outputs: Mapping[str, TensorDesc], where: Path) -> str:
    if PREFERRED_OUTPUT in outputs:
        return PREFERRED_OUTPUT
    if len(outputs) == 1:
        return next(iter(outputs))
    raise ModelLoadError(
        f"{where}: signature {SERVING_SIGNATURE} has outputs {sorted(outputs)}; "
        f"expected {PREFERRED_OUTPUT!r} or a single output"
    )


# The largest input side served: a model asking for more would have every image resized
# to gigabytes.
MAX_SIDE = 16_384


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
        or not (1 <= shape[1] <= MAX_SIDE and 1 <= shape[2] <= MAX_SIDE)
    ):
        # 0 x 0 (a TF Serving backend's metadata) loaded, and every request was a 500.
        raise ModelLoadError(
            f"{where}: input {input_name!r} is {image.dtype} {list(shape)}; expected "
            f"uint8 or float32 [N, height, width, 3] with height and width known, 1 to "
            f"{MAX_SIDE}"
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
