"""The TensorFlow runtime: the SavedModel's ``serving_default`` signature, as TF Serving runs it.

It serves any SavedModel whose signature takes one uint8 or float32 [N,H,W,3] image,
not only cnnserve's. A concrete function may be called from several threads at once, so
``predict`` needs no locking.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from service.contract import SERVING_SIGNATURE
from service.errors import ModelLoadError
from service.runtimes.base import Batch, ModelInfo, Probabilities, Runtime
from service.runtimes.card import TensorDesc, describe, to_model_input
from service.signatures import GraphTensor, read_signatures, signature_mismatch

log = logging.getLogger(__name__)


def _desc(spec: Any) -> TensorDesc:
    """TensorDesc of a tf.TensorSpec (typed Any: TensorFlow ships no type stubs)."""
    return TensorDesc(dtype=str(spec.dtype.name), shape=tuple(spec.shape.as_list()))


def _graph_tensor(spec: Any) -> GraphTensor:
    """GraphTensor of a tf.TensorSpec (None for an unknown rank)."""
    dims = spec.shape.as_list() if spec.shape.rank is not None else None
    return GraphTensor(int(spec.dtype.as_datatype_enum), None if dims is None else tuple(dims))


def _function_mismatch(public: Any, signatures: Mapping[str, Any]) -> str | None:
    """How a SignatureDef of ``saved_model.pb`` (what metadata advertises, what TF
    Serving feeds) differs from the loaded function that serves it, or None.

    ``tf.saved_model.load`` builds each signature's function from the object graph, never
    from the SignatureDef, so a SignatureDef edited or written apart from its graph loaded
    and advertised an input ("DT_FLOAT", "[-1,10]") that every request following it was
    refused for, while the graph's went on serving /v1/classify. TF Serving, which feeds
    the SignatureDef, would load it too and fail those requests at run time: refusing
    the version is what keeps the metadata true."""
    for name in sorted(public.signature_def):
        fn = signatures.get(name)
        if fn is None:  # e.g. __saved_model_init_op: no function to compare
            continue
        args, kwargs = fn.structured_input_signature
        outputs = fn.structured_outputs
        if args or not isinstance(outputs, Mapping):
            continue  # unnamed: refused below for serving_default, unused otherwise
        mismatch = signature_mismatch(
            name,
            public.signature_def[name],
            {key: _graph_tensor(spec) for key, spec in kwargs.items()},
            {key: _graph_tensor(spec) for key, spec in outputs.items()},
        )
        if mismatch is not None:
            return mismatch
    return None


def _set_intra_op_threads(threads: int) -> None:
    """TF's thread pools are process-wide and fixed once TF has run anything; best effort."""
    import tensorflow as tf

    if threads <= 0 or tf.config.threading.get_intra_op_parallelism_threads() == threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        log.info("TensorFlow already initialized; intra-op threads stay as they are")


class TensorFlowRuntime(Runtime):
    """One SavedModel version loaded with ``tf.saved_model.load``."""

    name = "tensorflow"

    def __init__(
        self, version_dir: Path, *, threads: int = 0, card: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(version_dir, threads=threads, card=card)
        self._loaded: Any = None
        self._fn: Any = None

    def load(self) -> ModelInfo:
        if not (self.version_dir / "saved_model.pb").is_file():
            raise ModelLoadError(f"{self.version_dir} is not a SavedModel (no saved_model.pb)")
        # Before TensorFlow: a clear refusal of a corrupt folder, and the metadata kept.
        public = read_signatures(self.version_dir)
        import tensorflow as tf

        _set_intra_op_threads(self.threads)
        # TF raises OpError, ValueError, OSError, KeyError... depending on what is wrong
        # with the folder; the caller sees one error type that names it.
        try:
            loaded = tf.saved_model.load(str(self.version_dir))
        except Exception as exc:
            raise ModelLoadError(f"cannot load SavedModel {self.version_dir}: {exc}") from exc
        signatures = getattr(loaded, "signatures", {})
        if SERVING_SIGNATURE not in signatures:
            raise ModelLoadError(
                f"{self.version_dir}: no {SERVING_SIGNATURE!r} signature (has {sorted(signatures)})"
            )
        fn = signatures[SERVING_SIGNATURE]
        try:
            mismatch = _function_mismatch(public, signatures)
            if mismatch is not None:
                raise ModelLoadError(f"{self.version_dir}: {mismatch}")
            args, kwargs = fn.structured_input_signature
            outputs = fn.structured_outputs
            if args or not isinstance(outputs, dict):
                raise ValueError("signature inputs and outputs must be named")
            info = describe(
                {name: _desc(spec) for name, spec in kwargs.items()},
                {name: _desc(spec) for name, spec in outputs.items()},
                self.card,
                self.version_dir,
            )
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"{self.version_dir}: unusable {SERVING_SIGNATURE}: {exc}"
            ) from exc
        self._loaded, self._fn = loaded, fn  # the function needs its SavedModel kept alive
        self._signatures = public
        self._info = info
        log.info(
            "loaded %s with tensorflow: %s %s → %d classes",
            self.version_dir,
            info.input.dtype,
            [info.input.height, info.input.width, 3],
            info.num_classes,
        )
        return info

    def predict(self, batch: Batch, deadline: float | None = None) -> Probabilities:
        info = self.info
        fn = self._fn
        x = to_model_input(batch, info.input)
        if len(x) == 0:
            return np.zeros((0, info.num_classes), np.float32)
        import tensorflow as tf

        out = fn(**{info.input_name: tf.constant(x)})[info.output_name]
        return np.asarray(out.numpy(), dtype=np.float32)

    def unload(self) -> None:
        self._loaded = self._fn = None
        super().unload()
