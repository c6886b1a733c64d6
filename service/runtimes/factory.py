"""Pick the runtime a setting names: ``tensorflow``, ``litert`` or ``auto``.

``auto`` prefers LiteRT (several times faster on CPU for small CNNs) but only with an
artifact proven to reproduce the SavedModel; otherwise it serves the SavedModel itself
with TensorFlow and logs why, so a model is never unservable just for lack of a twin.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.errors import ModelLoadError
from service.repository import load_card
from service.runtimes.base import Runtime
from service.runtimes.card import FLOAT_PRECISION, artifact_precision, stale_artifact

RUNTIME_NAMES = ("auto", "tensorflow", "litert")


def create_runtime(
    name: str,
    version_dir: Path,
    *,
    cache_dir: Path,
    threads: int,
    card: Mapping[str, Any] | None = None,
) -> Runtime:
    """An unloaded runtime for ``version_dir``; call ``load()`` next.

    For ``auto`` this already finds (or converts and verifies, seconds, cached) the
    LiteRT artifact, so call it where you would call ``load()``: off the event loop.
    ``card`` is the version's model card when the caller has read it (else read here).
    """
    from service.runtimes.tensorflow import TensorFlowRuntime

    card = load_card(version_dir) if card is None else card
    if name == "tensorflow":
        return TensorFlowRuntime(version_dir, threads=threads, card=card)
    if name not in RUNTIME_NAMES:
        raise ValueError(f"unknown runtime {name!r}; expected one of {', '.join(RUNTIME_NAMES)}")
    runtime = _litert_or_fallback(
        name, version_dir, cache_dir=cache_dir, threads=threads, card=card
    )
    with contextlib.suppress(OSError):  # an unreadable file: the load says so
        runtime.stale_artifact = stale_artifact(version_dir, card)
    return runtime


def _litert_or_fallback(
    name: str, version_dir: Path, *, cache_dir: Path, threads: int, card: Mapping[str, Any]
) -> Runtime:
    """``litert``'s runtime; or ``auto``'s: LiteRT with a verified artifact, else
    TensorFlow."""
    from service.runtimes.conversion import FilesChanged
    from service.runtimes.litert import LiteRTRuntime, litert_artifact
    from service.runtimes.tensorflow import TensorFlowRuntime

    if name == "litert":
        return LiteRTRuntime(version_dir, cache_dir=cache_dir, threads=threads, card=card)
    try:
        litert_artifact(version_dir, cache_dir, card)
    except FilesChanged:
        raise  # TensorFlow would read them as they are now: still changing
    except ModelLoadError as exc:
        if artifact_precision(card) != FLOAT_PRECISION:
            # The version *is* its quantized artifact: serving the float SavedModel in its
            # place would pose as it, so the refusal stands.
            raise
        # Said once TensorFlow has loaded it (service.loading): when the SavedModel
        # itself is broken, its load error is the one line to read, not a warning about
        # the artifact first ("made from another SavedModel" of a truncated one).
        fallback = TensorFlowRuntime(version_dir, threads=threads, card=card)
        fallback.fallback_reason = f"no verified LiteRT artifact ({exc})"
        return fallback
    # The artifact is now shipped or cached, so LiteRTRuntime.load() only reads it.
    return LiteRTRuntime(version_dir, cache_dir=cache_dir, threads=threads, card=card)
