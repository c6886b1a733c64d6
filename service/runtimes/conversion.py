"""SavedModel → LiteRT, kept only when it reproduces the SavedModel.

Used at export (the version ships ``assets.extra/model.tflite`` when verified) and at
serving time for SavedModels that came without one: :func:`cached_artifact` converts
once into ``cache_dir/<sha256>/model.tflite`` beside a ``verification.json`` recording
the measured difference. A conversion that does not verify is refused, never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.contract import INPUT_NAME, OUTPUT_NAME, SERVING_SIGNATURE
from service.errors import InvalidRequest, ModelLoadError
from service.repository import read_warmup
from service.runtimes.base import Batch, InputSpec
from service.runtimes.card import (
    saved_model_digest,
    to_model_input,
    variables_data_digest,
)
from service.runtimes.graph_rewrite import pool_before_affine
from service.warmup import WarmupFormatError

log = logging.getLogger(__name__)

# A converted artifact may differ from the SavedModel by float rounding, nothing more.
LITERT_TOLERANCE = 1e-4
# Part of the cache key: raised whenever what convert() makes changes (2: average
# pooling before the normalization), so a cache filled by an older cnnserve converts
# again once instead of serving the slower graph for ever.
CONVERSION_REVISION = 2
ARTIFACT = "model.tflite"
VERIFICATION = "verification.json"

Reference = Callable[[Batch], npt.NDArray[np.float32]]


def convert_saved_model(saved_model: Path) -> bytes:
    """The flatbuffer of the serving signature, builtin ops only (what LiteRT runs),
    average pooling moved before the normalization that feeds it (graph_rewrite)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model), signature_keys=[SERVING_SIGNATURE]
    )
    return pool_before_affine(bytes(converter.convert()))


def max_abs_diff(
    content: bytes,
    *,
    input_name: str,
    output_name: str,
    reference: Reference,
    samples: Sequence[Batch],
) -> float:
    """Largest |LiteRT - reference| over every sample batch (model-space inputs)."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=content).get_signature_runner(SERVING_SIGNATURE)
    return max(
        float(np.max(np.abs(runner(**{input_name: x})[output_name] - reference(x))))
        for x in samples
    )


def atomic_write(path: Path, data: bytes) -> None:
    """Write beside ``path`` then rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def convert_litert(
    saved_model: Path, target: Path, reference: Reference, samples: npt.NDArray[np.uint8]
) -> dict[str, Any]:
    """Export-time conversion: keep ``target`` only if it reproduces the SavedModel.

    Each of ``samples`` (uint8 [K,H,W,3]) is checked on its own; returns the card's
    ``runtimes.litert`` record.
    """
    content = convert_saved_model(saved_model)
    max_diff = max_abs_diff(
        content,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        reference=reference,
        samples=[x[None] for x in samples],
    )
    info: dict[str, Any] = {
        "file": target.name,
        # What the artifact is a twin of: a load serves it only beside that SavedModel.
        "saved_model_sha256": saved_model_digest(saved_model),
        # The weights a load checks are still there (the artifact does not read them).
        "variables_data_sha256": variables_data_digest(saved_model),
        "verified_samples": len(samples),
        "max_abs_diff": max_diff,
        "tolerance": LITERT_TOLERANCE,
        "verified": max_diff <= LITERT_TOLERANCE,
    }
    if info["verified"]:
        atomic_write(target, content)
        info["bytes"] = len(content)
        # What a load checks before serving it: a damaged copy answers NaN.
        info["sha256"] = hashlib.sha256(content).hexdigest()
    else:
        log.warning(
            "LiteRT conversion differs by %.3g > %.0e; not kept", max_diff, LITERT_TOLERANCE
        )
    return info


def cache_key(version_dir: Path) -> str:
    """sha256 of saved_model.pb, the variables index and data shards, and
    CONVERSION_REVISION: same graph, weights and conversion, same key.

    The shards count too: with the index alone, a folder whose shard was truncated or
    overwritten found the conversion of its intact self and served it; now it misses,
    and the conversion (TensorFlow reads and checks every weight) refuses it.
    """
    parts = (saved_model_digest(version_dir), variables_data_digest(version_dir))
    return hashlib.sha256(
        f"cnnserve conversion {CONVERSION_REVISION}\0{parts[0]}\0{parts[1]}".encode()
    ).hexdigest()


def _tf_version() -> str:
    try:
        return metadata.version("tensorflow")
    except metadata.PackageNotFoundError:
        return "unknown"


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _warmup_inputs(version_dir: Path, input_name: str, spec: InputSpec) -> list[Batch]:
    """Model inputs of the version's serving_default warmup records, if any (read by
    the same reader that warms a loading version)."""
    try:
        requests = read_warmup(version_dir)
        return [to_model_input(r[input_name], spec) for r in requests if input_name in r]
    except (WarmupFormatError, InvalidRequest) as exc:
        # Warmup records only add samples; the random ones still verify the conversion.
        log.warning("%s: skipping warmup records for verification: %s", version_dir, exc)
        return []


def cached_artifact(version_dir: Path, cache_dir: Path) -> Path:
    """A verified .tflite for ``version_dir`` from the cache, converting on a miss.

    Raises ModelLoadError when conversion fails or does not verify. Two processes
    missing at once both convert and both rename into place; the files are equivalent.
    """
    folder = cache_dir / cache_key(version_dir)
    artifact, record_path = folder / ARTIFACT, folder / VERIFICATION
    record = _read_record(record_path)
    if record is not None and record.get("verified") is True and artifact.is_file():
        return artifact
    # A refusal is cached too (so every worker start does not pay for it again), but only
    # for the converter and tolerance that produced it.
    if (
        record is not None
        and record.get("verified") is False
        and record.get("tolerance") == LITERT_TOLERANCE
        and record.get("tensorflow") == _tf_version()
    ):
        raise ModelLoadError(_refusal(version_dir, record))
    record = _convert_and_verify(version_dir, folder)
    if not record["verified"]:
        raise ModelLoadError(_refusal(version_dir, record))
    return artifact


class FilesChanged(ModelLoadError):
    """The folder's files changed while they were converted (a copy still going on):
    what was converted is of no one state of the folder, so it is neither cached nor
    served, and no other runtime stands in for it."""


def _refusal(version_dir: Path, record: dict[str, Any]) -> str:
    return (
        f"{version_dir}: LiteRT conversion differs from the SavedModel by "
        f"{record.get('max_abs_diff')} > {record.get('tolerance')}; refusing to serve it"
    )


def _convert_and_verify(version_dir: Path, folder: Path) -> dict[str, Any]:
    from service.runtimes.tensorflow import TensorFlowRuntime

    log.info("converting %s to LiteRT into %s", version_dir, folder)
    reference = TensorFlowRuntime(version_dir)
    info = reference.load()  # ModelLoadError here names the folder already
    try:
        spec = info.input
        rng = np.random.default_rng(0)
        samples = [
            to_model_input(rng.integers(0, 256, (n, spec.height, spec.width, 3), np.uint8), spec)
            for n in (1, 3)
        ]
        samples += _warmup_inputs(version_dir, info.input_name, spec)
        try:
            content = convert_saved_model(version_dir)
            diff = max_abs_diff(
                content,
                input_name=info.input_name,
                output_name=info.output_name,
                reference=reference.predict,
                samples=samples,
            )
        except Exception as exc:  # converter and interpreter raise many unrelated types
            raise ModelLoadError(f"{version_dir}: LiteRT conversion failed: {exc}") from exc
    finally:
        reference.unload()
    record: dict[str, Any] = {
        "source": str(version_dir),
        "signature": SERVING_SIGNATURE,
        "verified_samples": sum(len(x) for x in samples),
        "max_abs_diff": diff,
        "tolerance": LITERT_TOLERANCE,
        "verified": diff <= LITERT_TOLERANCE,
        "bytes": len(content),
        "tensorflow": _tf_version(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if cache_key(version_dir) != folder.name:
        # Filed under the key read before, the conversion of other files was found by
        # any later folder of the first files: a truncated shard served, an intact
        # model refused (an outside review, copying files in during a conversion).
        raise FilesChanged(
            f"{version_dir}: its files changed while they were converted (still being "
            "copied?); it is loaded again once they change no more. Publish a version "
            "by renaming its complete folder into place"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if record["verified"]:
        # Artifact first: a verification record never points at a missing file.
        atomic_write(folder / ARTIFACT, content)
    else:
        log.warning("%s", _refusal(version_dir, record))
    atomic_write(folder / VERIFICATION, (json.dumps(record, indent=2) + "\n").encode())
    return record
