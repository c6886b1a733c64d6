"""The runtime contract: what the registry and the batcher need from a loaded model.

A runtime owns one model version. Nothing heavy happens in ``__init__``: ``load()``
reads and prepares the model (and may take seconds), ``predict()`` runs one batch and
is called from batch threads (or, for a runtime that says it computes on the calling
thread alone, short batches from the event loop: service.batching), ``unload()`` frees it.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.contract import INPUT_NAME, OUTPUT_NAME, SERVING_SIGNATURE
from service.repository import load_card

Batch = npt.NDArray[Any]
Probabilities = npt.NDArray[np.float32]


@dataclass(frozen=True)
class InputSpec:
    """What ``predict`` takes: [N, height, width, 3] of ``dtype``."""

    height: int
    width: int
    dtype: str  # "uint8" or "float32"
    # For float inputs: x_float = x_uint8 * scale + offset, as the card declares, or [0, 1].
    scale: float = 1.0
    offset: float = 0.0


@dataclass
class ModelInfo:
    """What the gateway knows about a loaded version, whatever the runtime."""

    input: InputSpec
    num_classes: int
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    signature_name: str = SERVING_SIGNATURE
    extra: dict[str, Any] = field(default_factory=dict)


class BatchDeadline(float):
    """A batch's deadline (time.monotonic), as the batcher hands it to ``predict``, that
    also tells when every request of the batch is gone (expired, or its client left):
    a remote runtime cancels its call then (:meth:`on_abandoned`). A call left running
    held the model's batch thread for the most patient request's whole deadline, and
    every other request of the model waited behind it (one stuck TF Serving call and a
    client asking 90 s: 504s for everyone for 90 s)."""

    _callbacks: list[Callable[[], object]]
    _abandoned: bool
    _lock: threading.Lock

    def __new__(cls, when: float) -> BatchDeadline:
        deadline = super().__new__(cls, when)
        deadline._callbacks, deadline._abandoned = [], False
        deadline._lock = threading.Lock()
        return deadline

    def on_abandoned(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` once every request is gone (now, if they are)."""
        with self._lock:
            if not self._abandoned:
                self._callbacks.append(callback)
                return
        callback()

    def abandon(self) -> None:
        """Every request of the batch is gone (the batcher, on its event loop)."""
        with self._lock:
            self._abandoned, callbacks = True, self._callbacks
            self._callbacks = []
        for callback in callbacks:
            callback()


class Runtime(abc.ABC):
    """One model version in memory."""

    name: str = "runtime"

    def __init__(
        self, version_dir: Path, *, threads: int = 0, card: Mapping[str, Any] | None = None
    ) -> None:
        self.version_dir = version_dir
        self.threads = threads
        self._info: ModelInfo | None = None
        # A TF Serving SignatureDefMap, set by load (read from the SavedModel once: the
        # folder may be deleted while the version keeps serving).
        self._signatures: Any = None
        # The loader passes the card it read (once per load, not once per reader).
        self._card = card
        # Why this runtime serves in place of the one asked for (``auto`` without a
        # verified LiteRT artifact), said once it has loaded (service.loading).
        self.fallback_reason: str | None = None
        # Why the artifact export verified is not served (service.runtimes.card.
        # stale_artifact), said once it has loaded too.
        self.stale_artifact: str | None = None

    @property
    def card(self) -> Mapping[str, Any]:
        """The version's model card ({} for foreign SavedModels), read at most once;
        ModelLoadError when it is there but unreadable (it is read while loading)."""
        if self._card is None:
            self._card = load_card(self.version_dir)
        return self._card

    @property
    def computes_on_caller(self) -> bool:
        """``predict`` computes on the calling thread alone (no thread pool of its own,
        no waiting on anything but the CPU), so a short batch may run on the event loop."""
        return False

    @property
    def ready(self) -> bool:
        return self._info is not None

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError(f"{self.name} runtime for {self.version_dir} is not loaded")
        return self._info

    @abc.abstractmethod
    def load(self) -> ModelInfo:
        """Load the model; raise ModelLoadError with a clear message on failure."""

    @abc.abstractmethod
    def predict(self, batch: Batch, deadline: float | None = None) -> Probabilities:
        """[N,H,W,3] in the input dtype → float32 [N, num_classes]. Thread-safe.

        ``deadline`` (time.monotonic) is the latest any request in the batch still wants
        an answer; in-process runtimes finish in milliseconds and ignore it, a remote one
        gives its call no longer than that."""

    def predict_parts(self, parts: Sequence[Batch], deadline: float | None = None) -> Probabilities:
        """``predict`` on ``parts`` one after another on axis 0 (the batcher's requests,
        in order): the answers for all their rows. A runtime that copies its input into
        buffers of its own anyway takes the parts as they are (LiteRT); by default they
        are concatenated into one batch."""
        batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self.predict(batch, deadline)

    def predict_steps(self, parts: Sequence[Batch]) -> Iterator[Probabilities]:
        """:meth:`predict_parts`'s answer in pieces, in order, each computed as it is asked
        for: the batcher runs a batch on the event loop a step at a time while the worker
        sheds (service.batching). By default, one step: the whole batch."""
        yield self.predict_parts(parts)

    def signature_defs(self) -> Any:
        """The model's public signatures, a TF Serving ``SignatureDefMap`` (for metadata):
        read from the SavedModel when it loaded; a remote runtime asked its server."""
        if self._signatures is None:
            raise RuntimeError(f"{self.name} runtime for {self.version_dir} is not loaded")
        return self._signatures

    def leave_thread(self) -> None:
        """Free what this runtime holds for the calling thread alone (a thread that will
        not predict again, e.g. the one that loaded and warmed it); nothing by default."""
        return None

    def unload(self) -> None:
        self._info = None
        self._signatures = None
