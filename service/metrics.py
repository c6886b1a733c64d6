"""Every Prometheus metric of the gateway, defined once, and the functions that record them.

Names carry their unit (``_seconds``, ``_total``; sizes and depths count images) and
every label is bounded: ``model`` and ``version`` are names the registry resolved (never
what a client typed), ``class`` comes from the model's labels, ``route`` is the route
template, ``stage``/``state``/``protocol`` are fixed sets. docker/ builds its rules and
dashboard from these names only; a test keeps the two in step.

Several worker processes: ``cnnserve serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a
fresh folder before any worker imports prometheus-client, so each process writes its
samples to files there and ``GET /metrics`` sums them (gauges: live processes only).
The value store is chosen when prometheus-client is imported, which is why this module
must not be imported by the process that sets the variable before it is set. Without the
variable (tests, the in-process app) metrics live in the default in-memory registry.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from service.readiness import process_alive

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
PROTOCOLS: Final = ("rest", "grpc")
STAGES: Final = ("decode", "queue_wait", "inference", "encode")
VERSION_STATES: Final = ("START", "LOADING", "AVAILABLE", "UNLOADING", "END")
MODEL_EVENTS: Final = ("loaded", "load_failed", "unloaded")
UNMATCHED_ROUTE: Final = "unmatched"
# Why a request was refused at admission (503 overloaded): the item cap of the batch
# queue; the seconds of inference queued ahead over the queue-wait budget, or over what
# is left of the request's deadline; the seconds of decoding queued ahead over the
# budget; too many requests in one worker; too many open HTTP connections to it; too
# many request body bytes held by it; a new connection that waited too long to be
# accepted; a TF Serving backend that refused it.
SHED_REASONS: Final = (
    "queue_full", "queue_budget", "deadline", "decode_queue", "concurrency",
    "connections", "bodies", "backlog", "backend",
)  # fmt: skip
# Those a batcher reports (service.batching.BatchObserver.on_rejected): its admission's,
# and a backend's shed of a batch it sent.
BATCHER_SHED_REASONS: Final = ("queue_full", "queue_budget", "deadline", "backend")

# A request is decoded in ~1-20 ms and inferred in ~5-200 ms on a CPU; queueing adds up
# to batch_timeout; 10 s is the default deadline. Half a millisecond resolves a fast
# cache-warm decode; finer buckets would only cost series.
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Powers of two up to the largest max_batch_size the settings accept.
BATCH_BUCKETS: Final = tuple(float(2**i) for i in range(11))
CONFIDENCE_BUCKETS: Final = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
LOAD_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

REQUESTS = Counter(
    "cnnserve_requests",
    "Requests answered, by protocol, route template, resolved model/version and status. "
    "code is the HTTP status, also for gRPC (the status errors.py gives the same error).",
    ["protocol", "route", "model", "version", "code"],
)
REQUEST_DURATION = Histogram(
    "cnnserve_request_duration_seconds",
    "Whole-request latency, first byte in to last byte out, by the version that answered.",
    ["protocol", "route", "model", "version"],
    buckets=LATENCY_BUCKETS,
)
STAGE_DURATION = Histogram(
    "cnnserve_stage_duration_seconds",
    "Latency of one stage of a request: decode, queue_wait, inference, encode. "
    "One observation per answered request, so the stage means add up to the request mean "
    "(a request whose deadline passed in the queue has no queue_wait or inference).",
    ["model", "stage"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "cnnserve_batch_size",
    "Images per inference batch.",
    ["model"],
    buckets=BATCH_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "cnnserve_queue_depth",
    "Images waiting for a batch, summed over worker processes.",
    ["model", "version"],
    multiprocess_mode="livesum",
)
QUEUE_CAPACITY = Gauge(
    "cnnserve_queue_capacity",
    "Images the batch queue holds before requests are refused (503), summed over workers; "
    "0 once the version unloads.",
    ["model", "version"],
    multiprocess_mode="livesum",
)
IN_FLIGHT = Gauge(
    "cnnserve_in_flight_requests",
    "Requests inside the data plane (decoding, queued or in inference), summed over workers.",
    ["model"],
    multiprocess_mode="livesum",
)
OVERLOAD_REJECTIONS = Counter(
    "cnnserve_overload_rejections",
    "Requests refused at admission (503 overloaded), by reason: queue_full, queue_budget, "
    "deadline, decode_queue, concurrency, connections, bodies, backlog (model empty: refused "
    "before routing), backend.",
    ["model", "reason"],
)
CONCURRENCY_LIMIT = Gauge(
    "cnnserve_concurrency_limit",
    "Requests a worker admits at once now (adapted to the latency budget; summed over "
    "workers); more are refused with reason concurrency.",
    multiprocess_mode="livesum",
)
GRPC_CALLS_WAITING = Gauge(
    "cnnserve_grpc_calls_waiting",
    "gRPC calls in gRPC's core that a worker has not taken yet, summed over workers: "
    "admission counts them as requests in flight (service.api.grpc_backlog).",
    multiprocess_mode="livesum",
)
EVENT_LOOP_LAG = Gauge(
    "cnnserve_event_loop_lag_seconds",
    "How late a worker's event loop runs a 10 ms timer, a moving average over ~50 ms (max "
    "over workers): what a request arriving now waits before its handler starts.",
    multiprocess_mode="livemax",
)
BORROWED_PLACES = Counter(
    "cnnserve_concurrency_borrowed",
    "Requests admitted over their worker's own concurrency limit, on places its sibling "
    "workers left unused (connections are split between workers unevenly).",
)
MOVED_CONNECTIONS = Counter(
    "cnnserve_concurrency_moved_connections",
    "HTTP connections closed after a 503 because another worker of the replica had room, "
    "or after a success while another worker held no request: the client's next connection "
    "may land there (connections are split unevenly).",
)
PACE_CHECKS = Counter(
    "cnnserve_refusal_pace_checks",
    "Checks of whether holding refusals slows the clients retrying them at once, by "
    "verdict: many_refusals (answered at once, they outnumbered the images answered "
    "eight to one: held, and measured), closed_loop (they came back faster when let go: "
    "held) or open_loop (they did not: answered at once for a while).",
    ["verdict"],
)
REFUSALS_LET_GO = Gauge(
    "cnnserve_refusal_pace_let_go",
    "Workers answering the refusals of clients retrying at once without the pace's wait: "
    "they are few beside the answers, or holding them did not slow those clients (an open "
    "loop; summed over workers).",
    multiprocess_mode="livesum",
)
HEADERS_TOO_LARGE = Counter(
    "cnnserve_headers_too_large",
    "Connections closed with a 431 because a request's line and headers went over "
    "CNNSERVE_MAX_HEADER_BYTES.",
)
HEADER_TIMEOUTS = Counter(
    "cnnserve_header_timeouts",
    "Connections closed with a 408 because a request's headers did not arrive within "
    "CNNSERVE_HEADER_READ_TIMEOUT_SECONDS (idle after connecting, or slowloris).",
)
SEND_TIMEOUTS = Counter(
    "cnnserve_send_timeouts",
    "Connections dropped because the client took none of an answer's bytes within "
    "CNNSERVE_SEND_TIMEOUT_SECONDS (its send buffer full all the while).",
)
MALFORMED_REQUESTS = Counter(
    "cnnserve_malformed_requests",
    "Connections closed with a 400 because what arrived was not HTTP/1.1 the parser "
    "could read (a bad request line, header or body framing).",
)
INFERENCE_SECONDS_PER_IMAGE = Gauge(
    "cnnserve_inference_seconds_per_image",
    "Moving average of inference seconds per image, what admission multiplies by the "
    "images queued (max over workers); 0 once the version unloads.",
    ["model", "version"],
    multiprocess_mode="livemax",
)
DEADLINE_EXPIRATIONS = Counter(
    "cnnserve_deadline_expirations",
    "Requests answered 504 deadline_exceeded, on either transport: their deadline passed "
    "while queued, decoding, or waiting for the backend (expired work is never run).",
    ["model"],
)
MODEL_VERSIONS = Gauge(
    "cnnserve_model_versions",
    "Worker processes holding a model version in a TF Serving state (START, LOADING, "
    "AVAILABLE, UNLOADING, END).",
    ["model", "version", "state"],
    multiprocess_mode="livesum",
)
MODEL_RUNTIME_INFO = Gauge(
    "cnnserve_model_runtime_info",
    "1 while a worker serves the version with this runtime (litert, tensorflow, tfserving) "
    "and artifact precision (float32, int8): which artifact answers, never a guess.",
    ["model", "version", "runtime", "precision"],
    multiprocess_mode="livemax",
)
MODEL_CONFIGURED = Gauge(
    "cnnserve_model_configured",
    "1 while models.config lists the model, 0 once it was removed.",
    ["model"],
    multiprocess_mode="livemax",
)
MODEL_EVENTS_TOTAL = Counter(
    "cnnserve_model_events",
    "Model version lifecycle events: loaded, load_failed, unloaded.",
    ["model", "event"],
)
MODEL_LOAD_DURATION = Histogram(
    "cnnserve_model_load_duration_seconds",
    "Time to load a version's runtime (excluding warm-up).",
    ["model"],
    buckets=LOAD_BUCKETS,
)
MODEL_WARMUP_DURATION = Histogram(
    "cnnserve_model_warmup_duration_seconds",
    "Time to replay a version's warm-up requests.",
    ["model"],
    buckets=LOAD_BUCKETS,
)


class WrittenOnSet:
    """An unlabelled "min over workers" gauge made when it is first set. Made with the
    module, its value was 0 in every process from the start: a worker that was starting,
    or failing to start in a loop (a TLS pair that does not load), pulled every min to 0,
    and the alerts on them (CnnserveBackendDown pages) fired for nothing. A worker that
    never sets it is left out of the min."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self._args = (name, documentation)
        self._gauge: Gauge | None = None
        self._lock = threading.Lock()

    def set(self, value: float) -> None:
        if self._gauge is None:
            with self._lock:
                if self._gauge is None:
                    self._gauge = Gauge(*self._args, multiprocess_mode="livemin")
        self._gauge.set(value)


BACKEND_UP = WrittenOnSet(
    "cnnserve_backend_up",
    "--backend tfserving: 1 while the last poll reached TF Serving, 0 while it cannot "
    "(requests then get 503 backend_unavailable; readiness is 503). Embedded: 1.",
)
MODELS_CONFIG_OK = WrittenOnSet(
    "cnnserve_models_config_ok",
    "1 while the last poll could read models.config, 0 while a change to it is refused "
    "(the models of the last good one keep serving; the log says why).",
)
API_KEYS_FILE_OK = WrittenOnSet(
    "cnnserve_api_keys_file_ok",
    "With CNNSERVE_API_KEYS_FILE: 1 while the worker's last read of it was good, 0 while "
    "it cannot be read (the keys read before stay; a worker that never read it refuses "
    "requests that need a key, 503 api_keys_unavailable; the log says why). Min over "
    "workers.",
)
TLS_FILES_OK = WrittenOnSet(
    "cnnserve_tls_files_ok",
    "With TLS on: 1 while the worker's last check of CNNSERVE_TLS_CERTFILE and "
    "CNNSERVE_TLS_KEYFILE loaded them, 0 while a changed pair does not load (new "
    "connections keep the pair loaded before; the log says why). Min over workers.",
)
TLS_EXPIRY = WrittenOnSet(
    "cnnserve_tls_certificate_expiry_timestamp_seconds",
    "With TLS on: when the certificate served to new connections expires (Unix time). "
    "Min over workers.",
)
VERSION_LABELS = Gauge(
    "cnnserve_version_label",
    "1 for the version each version label (stable, canary) of a model points at, so "
    "per-version series can be compared by label.",
    ["model", "label", "version"],
    multiprocess_mode="livemax",
)
PREDICTIONS = Counter(
    "cnnserve_predictions",
    "Images by predicted (top-1) class: the class mix, for drift alerts.",
    ["model", "version", "class"],
)
TOP1_CONFIDENCE = Histogram(
    "cnnserve_top1_confidence_ratio",
    "Probability of the predicted class, one observation per image.",
    ["model", "version"],
    buckets=CONFIDENCE_BUCKETS,
)


# --- requests (any transport) -------------------------------------------------------


@functools.lru_cache(maxsize=8192)
def _series(metric: Any, labels: tuple[str, ...]) -> Any:
    """A labelled series, looked up once: prometheus-client's ``labels()`` validates and
    locks on every call, which the per-request metrics paid several times per request.
    Label sets are bounded (see above) and series are never removed, so the cache holds
    every series at most once."""
    return metric.labels(*labels)


def observe_request(
    protocol: str,
    route: str,
    model: str,
    version: str,
    code: int | str,
    seconds: float,
    *,
    deferred: bool = False,
) -> None:
    """One answered request. ``route`` is a template or RPC method name, never a raw path;
    ``model``/``version`` are what the registry resolved, or empty when nothing was.
    ``deferred``: written with the loop's others, soon after (:data:`TURN`)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    code = str(code)
    if deferred:
        TURN.request((protocol, route, model, version, code), seconds)
        return
    _series(REQUESTS, (protocol, route, model, version, code)).inc()
    if code == "504":
        _series(DEADLINE_EXPIRATIONS, (model,)).inc()
    _series(REQUEST_DURATION, (protocol, route, model, version)).observe(seconds)


def observe_stage(model: str, stage: str, seconds: float) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    _series(STAGE_DURATION, (model, stage)).observe(seconds)


@contextlib.contextmanager
def in_flight(model: str) -> Iterator[None]:
    gauge = _series(IN_FLIGHT, (model,))
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def observe_predictions(
    model: str, version: int, labels: Sequence[str], probabilities: npt.NDArray[Any]
) -> None:
    """Top-1 class and confidence of each image (rows of ``probabilities``)."""
    if probabilities.ndim != 2 or not len(probabilities):
        return
    top = probabilities.argmax(axis=1)
    v = str(version)
    # Class ids are below the model's class count, so the label set is bounded by it.
    for class_id, count in enumerate(np.bincount(top)):
        if count:
            name = labels[class_id] if class_id < len(labels) else str(class_id)
            PREDICTIONS.labels(model, v, name).inc(int(count))
    confidence = TOP1_CONFIDENCE.labels(model, v)
    for score in probabilities[np.arange(len(top)), top].tolist():
        confidence.observe(score)


# --- batching ----------------------------------------------------------------------


def observe_shed(model: str, reason: str, *, deferred: bool = False) -> None:
    """A request refused at admission outside a batcher (``model`` empty: before routing).
    ``deferred``: written with the loop's others, soon after (:data:`TURN`)."""
    if reason not in SHED_REASONS:
        raise ValueError(f"reason must be one of {SHED_REASONS}, got {reason!r}")
    if deferred:
        TURN.shed((model, reason))
    else:
        _series(OVERLOAD_REJECTIONS, (model, reason)).inc()


# How long the refusals the loop counts wait to be written (TurnTally).
TALLY_SECONDS = 0.01


class TurnTally:
    """Requests answered and shed on the event loop, counted in the process and written
    to their series together, :data:`TALLY_SECONDS` after the first of them, for the
    refusals the HTTP protocol answers at the headers (service.api.http_protocol): under
    an open loop a worker refuses thousands a second, and each refusal's three series
    updates (each a locked write to the metrics file with several workers) were ~15% of
    its CPU; written at the end of each turn of the loop, which mostly held one or two
    refusals, they still took 7.6 µs a refusal of the ~105 µs (12-07). Refusals of one
    route and reason make one update of each series, their durations one write per
    histogram bucket. A scrape answered by the same worker writes them first
    (service.api.rest); another worker's sees them at most that late. Outside a running
    loop (a test, a thread) it writes at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # a batch thread may shed while the loop counts
        self._shed: dict[tuple[str, str], int] = {}
        self._requests: dict[tuple[str, str, str, str, str], list[float]] = {}
        # The loop whose next turn writes what is counted: one that stops first (a test's
        # asyncio.run) never does, and the next count schedules its own.
        self._due: asyncio.AbstractEventLoop | None = None

    def shed(self, labels: tuple[str, str]) -> None:
        with self._lock:
            self._shed[labels] = self._shed.get(labels, 0) + 1
        self._schedule()

    def request(self, labels: tuple[str, str, str, str, str], seconds: float) -> None:
        with self._lock:
            durations = self._requests.get(labels)
            if durations is None:
                self._requests[labels] = [seconds]
            else:
                durations.append(seconds)
        self._schedule()

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._due is not loop:
            self._due = loop
            loop.call_later(TALLY_SECONDS, self.flush)

    def flush(self) -> None:
        """Write what was counted (when due; before a scrape; at shutdown, what is left)."""
        with self._lock:
            shed, self._shed = self._shed, {}
            requests, self._requests = self._requests, {}
            self._due = None
        for labels, count in shed.items():
            _series(OVERLOAD_REJECTIONS, labels).inc(count)
        for (protocol, route, model, version, code), durations in requests.items():
            _series(REQUESTS, (protocol, route, model, version, code)).inc(len(durations))
            if code == "504":
                _series(DEADLINE_EXPIRATIONS, (model,)).inc(len(durations))
            _observe_all(_series(REQUEST_DURATION, (protocol, route, model, version)), durations)


def _observe_all(histogram: Any, values: Sequence[float]) -> None:
    """``histogram.observe`` of each value, in one write per bucket and one to the sum.
    prometheus-client has no call for several values: this reads its bucket bounds and
    values (a histogram counts a value in the first bucket whose bound is at least the
    value, as observe does); a unit test holds it to observe's result."""
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1
    histogram._sum.inc(sum(values))
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(count)


TURN = TurnTally()


def set_concurrency_limit(limit: int) -> None:
    """The worker's concurrency limit, as :class:`service.concurrency.ConcurrencyLimit`
    adapts it."""
    CONCURRENCY_LIMIT.set(limit)


def set_grpc_calls_waiting(calls: int) -> None:
    """gRPC calls waiting in the worker's gRPC core (service.api.grpc_backlog)."""
    GRPC_CALLS_WAITING.set(calls)


def set_event_loop_lag(seconds: float) -> None:
    """The worker's event-loop lag (:attr:`service.concurrency.ConcurrencyLimit.lag`)."""
    EVENT_LOOP_LAG.set(seconds)


def observe_borrowed_place() -> None:
    """A worker at its concurrency limit admitted a request on a sibling's unused place
    (service.siblings)."""
    BORROWED_PLACES.inc()


def observe_moved_connection() -> None:
    """A client's connection is closed after its answer so that it may land on a sibling
    worker (service.concurrency)."""
    MOVED_CONNECTIONS.inc()


PaceVerdict = Literal["open_loop", "closed_loop", "many_refusals"]


def observe_pace_check(verdict: PaceVerdict) -> None:
    """A worker's check of whether holding refusals slows its spinning clients came to
    ``verdict`` (service.pace_check)."""
    PACE_CHECKS.labels(verdict).inc()


def set_refusals_let_go(let_go: bool) -> None:
    """Whether this worker answers spinning clients' refusals at once (service.pace_check)."""
    REFUSALS_LET_GO.set(1 if let_go else 0)


def observe_headers_too_large() -> None:
    """A connection sent more header bytes than allowed (service.api.http_protocol)."""
    HEADERS_TOO_LARGE.inc()


def observe_header_timeout() -> None:
    """A connection timed out before its request's headers (service.api.http_protocol)."""
    HEADER_TIMEOUTS.inc()


def observe_send_timeout() -> None:
    """A connection was dropped: its client stopped reading (service.api.http_protocol)."""
    SEND_TIMEOUTS.inc()


def observe_malformed_request() -> None:
    """A connection sent bytes the HTTP parser refused (service.api.http_protocol)."""
    MALFORMED_REQUESTS.inc()


class BatcherMetrics:
    """A :class:`service.batching.BatchObserver` for one model version's batcher."""

    def __init__(self, model: str, version: int, capacity: int, labels: Sequence[str] = ()) -> None:
        self._model = model
        self._version = version
        self._labels = labels
        v = str(version)
        self._batch = BATCH_SIZE.labels(model)
        self._wait = STAGE_DURATION.labels(model, "queue_wait")
        self._inference = STAGE_DURATION.labels(model, "inference")
        self._depth = QUEUE_DEPTH.labels(model, v)
        self._rejected = {r: OVERLOAD_REJECTIONS.labels(model, r) for r in BATCHER_SHED_REASONS}
        DEADLINE_EXPIRATIONS.labels(model)  # the series exists from the start, reading 0
        self._per_image = INFERENCE_SECONDS_PER_IMAGE.labels(model, v)
        # Series exist from the start, so rates and ratios read 0 rather than nothing.
        self._depth.set(0)
        self._capacity = QUEUE_CAPACITY.labels(model, v)
        self._capacity.set(capacity)

    def on_batch(self, size: int, outputs: npt.NDArray[Any]) -> None:
        self._batch.observe(size)
        # Per batch rather than per request: the counts are the same, the cost a batch's.
        observe_predictions(self._model, self._version, self._labels, outputs)

    def on_answered(self, queue_wait_seconds: float, inference_seconds: float) -> None:
        # Once per request (a request of several chunks was observed once per chunk, and
        # the stage means no longer added up to the request mean).
        self._wait.observe(queue_wait_seconds)
        self._inference.observe(inference_seconds)

    def on_rejected(self, reason: str = "queue_full") -> None:
        self._rejected[reason].inc()

    def on_cost(self, seconds_per_image: float) -> None:
        self._per_image.set(seconds_per_image)

    def on_expired(self, count: int) -> None:
        """Counted where the request is answered (observe_request: every 504 once, also
        those that expired outside a batcher), not per dropped chunk here."""

    def on_queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def on_stopped(self) -> None:
        # An unloaded version's queue holds nothing: its capacity and cost kept reading
        # what they last were, a version long gone still on the dashboard's queue panel.
        # (Set, not removed: worker processes share their values through files.)
        self._capacity.set(0)
        self._per_image.set(0)
        self._depth.set(0)


# --- model lifecycle ---------------------------------------------------------------


def announce_version(model: str, version: int, labels: Sequence[str]) -> None:
    """A version starts serving: its series exist from now on, reading 0 until used, so a
    class the model stops predicting shows in the class mix as 0, not as missing."""
    v = str(version)
    for name in labels:
        PREDICTIONS.labels(model, v, name)
    TOP1_CONFIDENCE.labels(model, v)
    IN_FLIGHT.labels(model)


def observe_runtime(
    model: str, version: int, runtime: str, precision: str, *, loaded: bool
) -> None:
    """The info series of a loaded version: 1 from load, 0 once it is unloaded."""
    MODEL_RUNTIME_INFO.labels(model, str(version), runtime, precision).set(1 if loaded else 0)


def observe_version_state(model: str, version: int, state: str) -> None:
    """One-hot over the states, so a version is counted in exactly one of them."""
    v = str(version)
    for name in VERSION_STATES:
        MODEL_VERSIONS.labels(model, v, name).set(1 if name == state else 0)


def observe_configured(previous: Iterable[str], current: Iterable[str]) -> None:
    now = set(current)
    for model in set(previous) - now:
        MODEL_CONFIGURED.labels(model).set(0)
    for model in now:
        MODEL_CONFIGURED.labels(model).set(1)


def observe_labels(model: str, previous: Mapping[str, int], current: Mapping[str, int]) -> None:
    """Version labels as routing applies them: moved or removed labels read 0."""
    for label, version in previous.items():
        if current.get(label) != version:
            VERSION_LABELS.labels(model, label, str(version)).set(0)
    for label, version in current.items():
        VERSION_LABELS.labels(model, label, str(version)).set(1)


def observe_backend(up: bool) -> None:
    BACKEND_UP.set(1 if up else 0)


def observe_models_config(ok: bool) -> None:
    MODELS_CONFIG_OK.set(1 if ok else 0)


def observe_api_keys_file(ok: bool) -> None:
    API_KEYS_FILE_OK.set(1 if ok else 0)


def observe_tls_files(*, ok: bool) -> None:
    TLS_FILES_OK.set(1 if ok else 0)


def observe_tls_expiry(timestamp: float) -> None:
    TLS_EXPIRY.set(timestamp)


def observe_model_event(model: str, event: str) -> None:
    if event not in MODEL_EVENTS:
        raise ValueError(f"event must be one of {MODEL_EVENTS}, got {event!r}")
    MODEL_EVENTS_TOTAL.labels(model, event).inc()


def observe_load(model: str, load_seconds: float, warmup_seconds: float) -> None:
    MODEL_LOAD_DURATION.labels(model).observe(load_seconds)
    MODEL_WARMUP_DURATION.labels(model).observe(warmup_seconds)


# --- exposition --------------------------------------------------------------------


def multiprocess_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def render() -> tuple[bytes, str]:
    """The /metrics body and its content type. Blocking (reads files): run in a thread."""
    directory = multiprocess_dir()
    if directory is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    forget_dead_processes(directory)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


PROCESSES_DIR: Final = "processes"  # not *.db: prometheus-client reads only those


def register_this_process() -> None:
    """Note this process's pid, so that its live gauges can be dropped once it is gone
    (from our own record; prometheus-client's file names are its private business).
    Done as the module is imported: that makes the files (an unlabelled gauge's value is
    made with the metric, at 0), and a worker that died before its app started (a TLS
    pair that does not load) left its zeros in every "min over workers" for good."""
    directory = multiprocess_dir()
    if directory is not None:
        (directory / PROCESSES_DIR).mkdir(exist_ok=True)
        (directory / PROCESSES_DIR / str(os.getpid())).touch()


def forget_dead_processes(directory: Path) -> None:
    """Drop the live gauges of worker processes that are gone (crashed and restarted by
    the supervisor, say), so in-flight and queue depth do not count them forever.
    Their counters and histograms stay, totals must not go backwards, unless they hold
    only zeros (a worker that died before it served): each such start left ~4 KB files
    for good, and while a respawned worker failed in a loop every scrape read more."""
    folder = directory / PROCESSES_DIR
    for entry in folder.iterdir() if folder.is_dir() else ():
        if entry.name.isdigit() and not process_alive(int(entry.name)):
            mark_process_dead(int(entry.name), str(directory))  # type: ignore[no-untyped-call]
            for written in directory.glob(f"*_{entry.name}.db"):
                if _all_zero(written):
                    written.unlink(missing_ok=True)
            entry.unlink(missing_ok=True)


def _all_zero(path: Path) -> bool:
    try:
        values = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
        return all(value == 0 for _key, value, _timestamp, _pos in values)
    except (OSError, ValueError):  # unreadable: leave it to the collector's own error
        return False


def forget_this_process() -> None:
    """At a worker's clean exit: its live gauges leave the sums at once."""
    directory = multiprocess_dir()
    if directory is not None:
        mark_process_dead(os.getpid(), str(directory))  # type: ignore[no-untyped-call]


register_this_process()
