"""Turning a version folder into a warmed runtime: the blocking half of loading a version.

Runs in a worker thread (the registry calls it through ``asyncio.to_thread``): it reads
the model, its labels, card and preprocessing, then replays the warmup records, so the
first real request does not pay for graph tracing or interpreter allocation. Anything
wrong raises; the registry records the failure and keeps serving what it served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from service.errors import ModelLoadError
from service.preprocessing import PreprocessSpec
from service.repository import ASSETS_EXTRA, LABELS_FILE, load_card, read_labels, read_warmup
from service.runtimes.base import ModelInfo, Runtime
from service.warmup import WarmupFormatError

log = logging.getLogger(__name__)


class RuntimeFactory(Protocol):
    """:func:`service.runtimes.create_runtime`'s signature (tests pass their own)."""

    def __call__(
        self,
        name: str,
        version_dir: Path,
        *,
        cache_dir: Path,
        threads: int,
        card: Mapping[str, Any] | None = None,
    ) -> Runtime: ...


@dataclass(frozen=True)
class PreparedVersion:
    """A loaded and warmed runtime with what requests need beside it."""

    runtime: Runtime
    labels: list[str]
    spec: PreprocessSpec
    card: Mapping[str, Any]
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0


def prepare_version(
    path: Path,
    *,
    runtime_factory: RuntimeFactory,
    runtime_name: str,
    cache_dir: Path,
    threads: int,
) -> PreparedVersion:
    """Create, load and warm the runtime of one version folder. Blocking (seconds)."""
    started = time.perf_counter()
    # Creating the runtime may convert and verify a LiteRT artifact: part of the load.
    # The card is read here once; the runtime and the steps below share it. A corrupt one
    # fails the load (load_card), as one with unusable preprocessing does.
    card = load_card(path)
    runtime = runtime_factory(runtime_name, path, cache_dir=cache_dir, threads=threads, card=card)
    return prepare_runtime(runtime, path, started=started)


def prepare_runtime(
    runtime: Runtime, path: Path, *, started: float | None = None
) -> PreparedVersion:
    """Load and warm ``runtime``; labels and warmup records come from ``path``, the card
    from the runtime, each optional (a remote runtime's folder may not be visible here at all).
    ``started`` is when the load began (perf_counter), if before this call."""
    started = time.perf_counter() if started is None else started
    info = runtime.load()
    if runtime.stale_artifact is not None:
        log.warning("%s: %s; not serving it", path, runtime.stale_artifact)
    if runtime.fallback_reason is not None:
        log.warning("%s: %s; serving it with %s", path, runtime.fallback_reason, runtime.name)
    try:
        labels = read_labels(path, info.num_classes)
        card = runtime.card
        _check_card_labels(card, labels, path)
        _say_if_unlabelled(path)
        spec = preprocess_spec(card, info, path)
        loaded = time.perf_counter()
        warm_up(runtime, info, path)
        # Requests run on the batcher's thread or the event loop, never on this one
        # (a pool thread that lives on): what warming made for it would only take memory.
        runtime.leave_thread()
    except BaseException:
        runtime.unload()
        raise
    return PreparedVersion(
        runtime=runtime,
        labels=labels,
        spec=spec,
        card=card,
        load_seconds=loaded - started,
        warmup_seconds=time.perf_counter() - loaded,
    )


def _check_card_labels(card: Mapping[str, Any], labels: list[str], path: Path) -> None:
    """labels.txt and the model card's own list of the classes must agree where both are
    there: a labels.txt with two lines swapped was served without a word, a trouser
    answered "T-shirt/top", and `cnnserve verify` (which reads the same file) agreed
    with it (an outside audit, 12-07)."""
    recorded = card.get("labels")
    if recorded is None or not (path / ASSETS_EXTRA / LABELS_FILE).exists():
        return
    if not isinstance(recorded, list) or not all(isinstance(x, str) for x in recorded):
        raise ModelLoadError(f"{path}: the model card's labels are not a list of names")
    if recorded != labels:
        if len(recorded) != len(labels):
            why = f"it names {len(recorded)} classes, labels.txt {len(labels)}"
        else:
            at = next(i for i, (a, b) in enumerate(zip(recorded, labels, strict=True)) if a != b)
            why = f"class {at} is {recorded[at]!r} in the card, {labels[at]!r} in labels.txt"
        raise ModelLoadError(
            f"{path}: labels.txt and the model card's labels disagree ({why}); "
            "re-export the version, or correct the one that is wrong"
        )


def _say_if_unlabelled(path: Path) -> None:
    """A WARNING for a version served without class names: one whose folder has no
    labels.txt (a version copied in file by file was loaded before its assets.extra,
    and served indices, "label": "9", for good with no word of it), and one whose folder
    is not on this machine at all (TF Serving serves a version this gateway's repository
    lacks: served with indices, the log naming a folder that does not exist)."""
    if not path.exists():
        log.warning(
            "%s is not on this machine: its answers name classes by index (0, 1, ...) "
            "and images are preprocessed by the model's input size alone; give the "
            "gateway the repository TF Serving serves, at the same path",
            path,
        )
    elif path.is_dir() and not (path / ASSETS_EXTRA / LABELS_FILE).is_file():
        log.warning(
            "%s has no %s/%s: its answers name classes by index (0, 1, ...); publish "
            "the file with the version (copy it under a temporary name, then rename it)",
            path,
            ASSETS_EXTRA,
            LABELS_FILE,
        )


def preprocess_spec(card: Mapping[str, Any], info: ModelInfo, path: Path) -> PreprocessSpec:
    """The card's preprocessing, else the model's input size with default resizing.

    A card that disagrees with the model's input size would fail every request, so it
    fails the load instead.
    """
    recorded = card.get("preprocessing")
    if recorded is None:
        return PreprocessSpec(height=info.input.height, width=info.input.width)
    if not isinstance(recorded, dict):
        kind = type(recorded).__name__
        raise ModelLoadError(f"{path}: model card preprocessing is a JSON {kind}, not an object")
    try:
        spec = PreprocessSpec.from_card(recorded)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: model card preprocessing is unusable: {exc}") from None
    if (spec.height, spec.width) != (info.input.height, info.input.width):
        raise ModelLoadError(
            f"{path}: model card says images are resized to {spec.height}x{spec.width} but "
            f"the model takes {info.input.height}x{info.input.width}"
        )
    return spec


def warmup_batches(path: Path, info: ModelInfo) -> list[npt.NDArray[Any]]:
    """The image batches of the version's serving_default warmup records, or one zero
    image when it has none (TF Serving runs nothing then; one run still pays tracing)."""
    try:
        requests = read_warmup(path)
    except (OSError, WarmupFormatError) as exc:
        raise ModelLoadError(f"{path}: unreadable warmup records: {exc}") from None
    batches = []
    for inputs in requests:
        if info.input_name in inputs:
            batches.append(inputs[info.input_name])
        elif len(inputs) == 1:
            batches.append(next(iter(inputs.values())))
        else:
            raise ModelLoadError(
                f"{path}: a warmup request has inputs {sorted(inputs)}; the model takes "
                f"{info.input_name!r}"
            )
    if not batches:
        batches.append(np.zeros((1, info.input.height, info.input.width, 3), np.uint8))
    return batches


def warm_up(runtime: Runtime, info: ModelInfo, path: Path) -> None:
    """Replay the warmup batches; a wrong answer shape fails the load as in TF Serving,
    and so does a non-finite score: a damaged artifact or weights answer NaN for every
    request, which no client can tell from a model's answer."""
    said = False
    for batch in warmup_batches(path, info):
        try:
            out = runtime.predict(batch)
        except Exception as exc:
            raise ModelLoadError(f"{path}: warm-up failed: {exc}") from exc
        if out.shape != (len(batch), info.num_classes):
            raise ModelLoadError(
                f"{path}: warm-up returned shape {list(out.shape)} for {len(batch)} images; "
                f"expected [{len(batch)}, {info.num_classes}]"
            )
        if not np.isfinite(out).all():
            raise ModelLoadError(
                f"{path}: warm-up returned non-finite scores (NaN or infinity) with the "
                f"{runtime.name} runtime; the model's weights or artifact are damaged"
            )
        said = said or _said_not_probabilities(out, path)


# How far a probability row may stray: a quantized (INT8) softmax sums to 1 within ~1%.
_PROBABILITY_SLACK = 0.05


def _said_not_probabilities(out: npt.NDArray[Any], path: Path) -> bool:
    """A WARNING for a model whose answers are not probabilities: /v1/classify and
    gRPC Classify report its outputs as scores as they are (a foreign SavedModel ending
    in logits answered "score": -3.2, and its top-1 confidence metric read nonsense;
    an outside audit, 12-07). Served all the same: TF Serving serves such a model, and
    its Predict answers are what the model computes."""
    if out.size == 0:  # a warm-up record of no images: nothing to judge
        return False
    low, high = float(out.min()), float(out.max())
    sums = out.sum(axis=1)
    if (
        low >= -_PROBABILITY_SLACK
        and high <= 1 + _PROBABILITY_SLACK
        and bool(np.all(np.abs(sums - 1) <= _PROBABILITY_SLACK))
    ):
        return False
    log.warning(
        "%s: the model's answers are not probabilities (warm-up answered values from "
        "%.4g to %.4g, rows summing to %.4g to %.4g): classify reports them as scores "
        "as they are, and the top-1 confidence metric means little; if they are logits, "
        "end the serving signature with a softmax",
        path,
        low,
        high,
        float(sums.min()),
        float(sums.max()),
    )
    return True
