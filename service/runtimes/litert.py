"""The LiteRT runtime: a verified .tflite twin of the SavedModel on the XNNPACK CPU path.

The artifact is the one export verified (``assets.extra/model.tflite``, card says so) or
one converted and verified into the cache on first load (:mod:`.conversion`). TensorFlow
is imported only for that conversion; serving a shipped artifact never loads it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.contract import SERVING_SIGNATURE
from service.errors import ModelLoadError
from service.runtimes.base import Batch, ModelInfo, Probabilities, Runtime
from service.runtimes.card import (
    FLOAT_PRECISION,
    TensorDesc,
    artifact_precision,
    describe,
    signature_tensors,
    to_model_input,
    twin_mismatch,
    verified_litert,
)
from service.signatures import read_signatures

log = logging.getLogger(__name__)

# A batch runs as chunks of at most MAX_CHUNK images (7 = 2 + 2 + 2 + 1) on one
# interpreter per thread, resized whenever a chunk's size changes: a resize costs
# ~0.02 ms, while an interpreter per chunk size (as before) held
# a copy of the packed weights each, and a batch of 7 (4 + 2 + 1) read three copies.
# Alone, on batch sizes as a batcher forms them (3-11, 2-core Xeon), MobileNetV3-Small
# cost 1.83-1.86 ms per image with an interpreter per size, 1.61-1.66 with one in chunks
# of up to 4 and 1.58-1.60 in chunks of up to 2; the default model 0.48-0.51 in all.
# At one fixed size, LiteRT costs about the same per image from 2 to 16 there (1.47-1.54
# ms), so bigger chunks buy nothing. End to end, chunks of up to 2 served
# MobileNetV3-Small 5% more than chunks of up to 4, the default model the same
# (docs/performance.md).
MAX_CHUNK = 2

# The batcher hands over its requests' images as they arrived, one array per request
# (predict_parts), and they are copied straight into the interpreter's input tensor,
# chunk by chunk: once. Concatenated into a batch first and then set into the input
# (the signature runner's set_tensor), they were copied twice, and in the server the
# concatenation read images decoded a while before, out of the caches: ~25 µs per image
# there (thread CPU time in the workers) against ~7 alone. End to end, the default
# model's CPU per request went down ~3% (lower in 6 of 8 alternating pairs);
# MobileNetV3-Small, ~3x the inference per image, showed no difference.


def litert_artifact(version_dir: Path, cache_dir: Path, card: Mapping[str, Any]) -> Path:
    """The verified .tflite to serve: export's, else the cache's (converting on a miss).

    Raises ModelLoadError when there is none and conversion fails or does not verify.
    """
    if not (version_dir / "saved_model.pb").is_file():
        raise ModelLoadError(f"{version_dir} is not a SavedModel (no saved_model.pb)")
    shipped = verified_litert(version_dir, card)
    if shipped is not None:
        return shipped
    from service.runtimes.conversion import cached_artifact

    return cached_artifact(version_dir, cache_dir)


def _desc(detail: dict[str, Any]) -> TensorDesc:
    shape = tuple(None if d < 0 else int(d) for d in detail["shape_signature"])
    return TensorDesc(dtype=np.dtype(detail["dtype"]).name, shape=shape)


class LiteRTRuntime(Runtime):
    """One version served from its verified LiteRT artifact."""

    name = "litert"

    def __init__(
        self,
        version_dir: Path,
        *,
        cache_dir: Path,
        threads: int = 0,
        card: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(version_dir, threads=threads, card=card)
        self.cache_dir = cache_dir
        self.artifact: Path | None = None
        self._content: bytes | None = None
        self._tensors = (0, 0)  # the served input and output tensors (set by load)
        self._local = threading.local()

    @property
    def computes_on_caller(self) -> bool:
        # One interpreter thread: XNNPACK computes on the thread that invokes.
        return (self.threads or 1) == 1

    def _new_interpreter(self) -> _Interpreter:
        content = self._content
        if content is None:
            raise RuntimeError(f"litert runtime for {self.version_dir} is not loaded")
        return _Interpreter(_open(content, self.threads), *self._tensors)

    def load(self) -> ModelInfo:
        # The artifact is served, but the SavedModel beside it is what the version is: a
        # corrupt one, or one that is no image classifier, fails the load too.
        signatures = read_signatures(self.version_dir)
        saved = describe(
            *signature_tensors(signatures.signature_def[SERVING_SIGNATURE]),
            self.card,
            self.version_dir,
        )
        artifact = litert_artifact(self.version_dir, self.cache_dir, self.card)
        try:
            self._content = artifact.read_bytes()
            opened = _open(self._content, self.threads)
            runner = opened.get_signature_runner(SERVING_SIGNATURE)
            given, answered = runner.get_input_details(), runner.get_output_details()
            inputs = {k: _desc(v) for k, v in given.items()}
            outputs = {k: _desc(v) for k, v in answered.items()}
        except Exception as exc:  # a truncated or foreign file fails in many ways
            self._content = None
            raise ModelLoadError(f"{self.version_dir}: cannot open {artifact}: {exc}") from exc
        info = describe(inputs, outputs, self.card, self.version_dir)
        mismatch = twin_mismatch(saved, info)
        if mismatch is not None:
            self._content = None
            raise ModelLoadError(f"{self.version_dir}: {mismatch}")
        try:
            self._tensors = _main_graph_tensors(
                opened, given[info.input_name]["index"], answered[info.output_name]["index"]
            )
        except ValueError as exc:
            self._content = None
            raise ModelLoadError(f"{self.version_dir}: {artifact}: {exc}") from None
        info.extra["artifact"] = str(artifact)
        # The shipped artifact (in the version's folder) carries the card's precision; a
        # cache conversion is float.
        shipped = artifact.is_relative_to(self.version_dir)
        info.extra["precision"] = artifact_precision(self.card) if shipped else FLOAT_PRECISION
        self.artifact = artifact
        self._local = threading.local()
        # The loading thread's own: warm-up predicts on it next (then leave_thread).
        self._local.interpreter = _Interpreter(opened, *self._tensors)
        self._signatures = signatures
        self._info = info
        log.info(
            "loaded %s with litert (%s) from %s",
            self.version_dir,
            info.extra["precision"],
            artifact,
        )
        return info

    def _interpreter(self) -> _Interpreter:
        """This thread's interpreter. Interpreters are not thread-safe, so each thread
        that predicts has its own (a threading.local)."""
        interpreter: _Interpreter | None = getattr(self._local, "interpreter", None)
        if interpreter is None:
            interpreter = self._local.interpreter = self._new_interpreter()
        return interpreter

    def leave_thread(self) -> None:
        # The thread's interpreter (its packed weights and arena).
        self._local.__dict__.pop("interpreter", None)

    def predict(self, batch: Batch, deadline: float | None = None) -> Probabilities:
        return self.predict_parts([batch], deadline)

    def predict_parts(self, parts: Sequence[Batch], deadline: float | None = None) -> Probabilities:
        outputs = list(self.predict_steps(parts))
        if not outputs:
            return np.zeros((0, self.info.num_classes), np.float32)
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def predict_steps(self, parts: Sequence[Batch]) -> Iterator[Probabilities]:
        """One step per chunk (MAX_CHUNK images, 0.6-1 ms for the default model)."""
        info = self.info
        inputs = [to_model_input(part, info.input) for part in parts]
        interpreter = self._interpreter()
        for chunk in _chunks(inputs, MAX_CHUNK):
            yield np.asarray(interpreter.run(chunk), dtype=np.float32)

    def unload(self) -> None:
        # Dropping the threading.local frees every thread's interpreter at once.
        self._local = threading.local()
        self._content = None
        super().unload()


def _open(content: bytes, threads: int) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=content, num_threads=threads or 1)


def _main_graph_tensors(interpreter: Any, given: int, answered: int) -> tuple[int, int]:
    """The serving signature's input and output tensors, which must be the main graph's:
    the public tensor API (``tensor``, ``get_tensor``) reaches only that graph. So they
    are in every artifact cnnserve converts or exports (one signature)."""
    main_inputs = [d["index"] for d in interpreter.get_input_details()]
    main_outputs = [d["index"] for d in interpreter.get_output_details()]
    if main_inputs != [given] or answered not in main_outputs:
        raise ValueError(
            f"its {SERVING_SIGNATURE!r} signature is not the main graph's; convert the "
            "SavedModel with cnnserve (or delete the artifact so that it is converted "
            "on load)"
        )
    return given, answered


class _Interpreter:
    """One thread's LiteRT interpreter, its input tensor sized for the last chunk run."""

    def __init__(self, interpreter: Any, given: int, answered: int) -> None:
        self.interpreter = interpreter
        self._input_index = given
        self._output_index = answered
        (detail,) = (d for d in interpreter.get_input_details() if d["index"] == given)
        self._image_shape = tuple(int(d) for d in detail["shape"][1:])
        self._rows = 0  # the input's batch size once allocated; 0 before
        # A numpy view of the input tensor, made anew per chunk: the interpreter refuses
        # to invoke while a view of its buffers is alive.
        self._input = interpreter.tensor(given)

    def run(self, chunk: list[Batch]) -> Batch:
        """The model on ``chunk``'s rows in order, each piece copied into the input."""
        rows = sum(len(piece) for piece in chunk)
        if rows != self._rows:
            self.interpreter.resize_tensor_input(self._input_index, (rows, *self._image_shape))
            self.interpreter.allocate_tensors()
            self._rows = rows
        view = self._input()
        at = 0
        for piece in chunk:
            view[at : at + len(piece)] = piece
            at += len(piece)
        del view
        self.interpreter.invoke()
        out: Batch = self.interpreter.get_tensor(self._output_index)
        return out


def _chunks(parts: Sequence[Batch], size: int) -> Iterator[list[Batch]]:
    """``parts``' rows in order, in chunks of ``size`` rows (the last may have fewer),
    each a list of slices of the parts (no copy)."""
    chunk: list[Batch] = []
    room = size
    for part in parts:
        start = 0
        while start < len(part):
            take = min(room, len(part) - start)
            chunk.append(part[start : start + take])
            start += take
            room -= take
            if room == 0:
                yield chunk
                chunk, room = [], size
    if chunk:
        yield chunk
