"""The transport-agnostic core: what REST and gRPC both call.

Adapters parse their wire format into plain Python/numpy values, call one method here,
and serialise the answer; validation, decoding, routing and batching happen here once.
Errors are :mod:`service.errors` exceptions, mapped to a status by each adapter.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from service import metrics
from service.batching import COST_WEIGHT, Correction, Reservation
from service.concurrency import ConcurrencyLimit, worker_limit
from service.config import Settings
from service.contract import BYTES_INPUT_NAME, BYTES_SIGNATURE, SERVING_SIGNATURE
from service.errors import (
    CnnserveError,
    DeadlineExceeded,
    ImageTooLarge,
    InvalidRequest,
    MethodNotAllowed,
    Overloaded,
    TooManyImages,
    UnknownSignature,
    VersionGone,
    VersionNotFound,
    bounded,
)
from service.memory import malloc_trim
from service.preprocessing import (
    Opened,
    PreprocessSpec,
    decode_cost,
    open_image,
    preprocess_opened,
    request_cost,
)
from service.readiness import WorkerReadiness
from service.registry import LoadedVersion, Registry, VersionStatus
from service.requestlog import note_images, note_target, note_timings

DEFAULT_TOP_K = 5
PIXELS_SETTING = "CNNSERVE_MAX_IMAGE_PIXELS"  # named where an image is refused for its size
# A lone image is decoded on the event loop only from a file this small (DataPlane.
# _decodes_inline); a module constant, not a setting: it bounds what one request can
# hold the loop for, not a trade-off to tune. A JPEG decoded at a reduced scale still
# reads all of its data, so its cost follows its bytes, not the pixels it decodes to:
# photo-like JPEGs took ~16 µs a KiB here (1024x768 in 255 KiB: 3.9 ms, though it
# decodes to 512x384), so 64 KiB is ~1 ms; a 224x224 upload is 10-20 KiB.
INLINE_DECODE_MAX_BYTES = 64 * 1024
# Decode admission counts each image's work in pixels (_decode_work), not images: a
# moving average of seconds per image, set by ordinary photos (~4 ms), let ten 6000x6000
# deflate TIFFs of 243 KB (~0.8 s of CPU each) in at once after 40 JPEGs, and refused
# them after large images; measured here, seconds per pixel of this work stay within
# 9-24 ns over JPEG, PNG, WebP, GIF and TIFF of 28x28 to 6000x6000 (per pixel of
# decode_cost alone, 4-300 ns: a JPEG decoded at 1/8 scale still reads all its data).
# Its bytes count DECODE_BYTES_PER_PIXEL to a pixel where they outweigh its pixels, and
# each image DECODE_PIXELS_PER_IMAGE more (converting and resizing to the model's size).
DECODE_BYTES_PER_PIXEL = 2
DECODE_PIXELS_PER_IMAGE = 4096
# Seconds per pixel of work before any decoding was measured (the fast end of the above):
# a burst of huge images on a fresh worker is not all admitted for want of a measure.
UNMEASURED_DECODE_SECONDS_PER_PIXEL = 10e-9

T = TypeVar("T")


class Prediction(NamedTuple):
    # A named tuple, not a frozen dataclass: a request builds top-k of them, and a
    # frozen dataclass's __init__ (object.__setattr__ per field) cost ~1 µs each.
    label: str
    class_id: int
    score: float


@dataclass
class ClassifyResult:
    model: str
    version: int
    results: list[list[Prediction]]
    # Seconds per stage (decode, queue_wait, inference), for Server-Timing and the access log.
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class PredictResult:
    model: str
    version: int
    outputs: dict[str, npt.NDArray[Any]]
    timings: dict[str, float] = field(default_factory=dict)
    signature: str = SERVING_SIGNATURE  # the one that ran (files go to the bytes one)


# Outputs wider than this many times k (ImageNet's 1,000 classes) are not fully sorted.
WIDE_OUTPUT = 8


def top_k(
    probabilities: npt.NDArray[np.float32], k: int, labels: Sequence[str]
) -> list[list[Prediction]]:
    """Each row's ``k`` best classes, best first, in numpy's order (NaN last, ties by
    index); built as Python lists, cheaper than indexing numpy scalars one at a time."""
    named = len(labels)
    if probabilities.shape[1] > WIDE_OUTPUT * k:
        best = _best_of_many(probabilities, k)
        scores = np.take_along_axis(probabilities, best, axis=1).tolist()
        return [
            [
                Prediction(labels[i] if i < named else str(i), i, v)
                for i, v in zip(idx, row, strict=True)
            ]
            for idx, row in zip(best.tolist(), scores, strict=True)
        ]
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k].tolist()
    return [
        [Prediction(labels[i] if i < named else str(i), i, row[i]) for i in idx]
        for row, idx in zip(probabilities.tolist(), order, strict=True)
    ]


def _best_of_many(probabilities: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.intp]:
    """The indices of each row's ``k`` largest values, as a stable descending sort gives
    them, sorting only the values at or above the k-th largest: a full sort of 1,000
    classes and the whole row as a list cost ~48 µs per request, this ~8 µs."""
    if np.isnan(probabilities).any():
        return np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    rows, classes = probabilities.shape
    kth = np.partition(probabilities, classes - k, axis=1)[:, classes - k]
    order = np.empty((rows, k), dtype=np.intp)
    for r, (row, least) in enumerate(zip(probabilities, kth, strict=True)):
        candidates = np.flatnonzero(row >= least)  # k or more, ties included
        order[r] = candidates[np.argsort(-row[candidates], kind="stable")[:k]]
    return order


class DataPlane:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        decode_pool: ThreadPoolExecutor,
        readiness: WorkerReadiness | None = None,
        concurrency: ConcurrencyLimit | None = None,
    ) -> None:
        self.settings = settings
        # Requests in this worker, against its limit (REST's RequestGuard and gRPC's
        # handlers share it).
        self.concurrency = concurrency or worker_limit(settings)
        # True once the gRPC server stops: open health Watch streams end, and a call
        # its stop ends is the server's 503 (see stopping).
        self.closing_calls = False
        self.registry = registry
        self._pool = decode_pool
        self._readiness = readiness or WorkerReadiness(None, 1)
        # Admission to the decode pool, as the batcher's to inference: images waiting or
        # decoding, their work in pixels (_decode_work), and a moving average of decode
        # seconds per pixel of that work (None: unmeasured).
        self._decoding = 0
        self._decoding_work = 0
        self._decoding_big = 0  # of that work, images over BIG_DECODE_PIXELS (one at a time)
        self._decode_per_pixel: float | None = None
        # How long decoding took against what the CPU-time estimate foresaw: the threads
        # wait for the GIL behind the event loop (a request of 16 images took 208 ms
        # where ~25 were foreseen), so the estimate alone let far too many in.
        self._decode_waits = Correction()
        self._decode_threads = max(1, decode_pool._max_workers)

    # --- health ---------------------------------------------------------------------

    def stopping(self) -> bool:
        """The gRPC server is stopping: running calls drain, and a call its stop ends
        is the server's 503, not the client's 499."""
        return self.closing_calls

    def ready(self) -> bool:
        """This process is ready and so is every sibling worker (see service.readiness)."""
        return self.registry.is_ready() and self._readiness.all_ready()

    def deadline(self, timeout_seconds: float | None, since: float | None = None) -> float:
        """Absolute monotonic deadline from a client timeout (or the default), counted
        from ``since`` (a monotonic time: when the request arrived) or now."""
        timeout = (
            self.settings.request_timeout_seconds if timeout_seconds is None else timeout_seconds
        )
        if not 0 < timeout < math.inf:  # nan and inf too: inf would turn the deadline off
            raise InvalidRequest(
                "the request's timeout (X-Request-Timeout, or a gRPC deadline) must be a "
                f"positive, finite number of seconds, got {timeout:g}"
            )
        settings = self.settings  # the default deadline is never cut
        timeout = min(
            timeout, max(settings.max_request_timeout_seconds, settings.request_timeout_seconds)
        )
        return (time.monotonic() if since is None else since) + timeout

    # --- classification ---------------------------------------------------------------

    def check_image_count(self, count: int) -> None:
        """TooManyImages past ``max_images_per_request``: checked before each image is
        decoded (or even unpacked from base64) where the count is known first."""
        limit = self.settings.max_images_per_request
        if count > limit:
            raise TooManyImages(
                f"{count} images in one request; the limit is {limit} "
                "(CNNSERVE_MAX_IMAGES_PER_REQUEST)"
            )
        note_images(count)

    async def decode(
        self,
        images: Sequence[bytes],
        target: LoadedVersion,
        deadline: float,
        held: Reservation,
        names: Sequence[str | None] = (),
    ) -> npt.NDArray[np.uint8]:
        """Decode and resize every image; a bad one fails the request with a message that
        says which (index, and ``names[i]`` when given). The images are admitted into
        ``held`` (``target``'s batcher's) before they are decoded, once their number and
        sizes are known, so a request that would be shed costs no decoding and those
        admitted count ahead of the next ones while they decode.

        A lone small image is decoded right here on the event loop: two thread hand-offs
        (to a decode thread and back) cost more CPU than decoding a 224×224 JPEG, and
        with a worker per core the loop's core has nothing better to do. What is small
        is judged from the header (pixels to decode, after JPEG's reduced-scale
        decoding), so a tiny file that unpacks into a large image still goes to the
        decode threads. Lists and large images are decoded there, in parallel, once
        every header was read here (:meth:`_open_all`)."""
        if not images:
            raise InvalidRequest("no image in the request; send one as the 'image' field or body")
        self.check_image_count(len(images))
        spec, max_pixels = target.spec, self.settings.max_image_pixels
        if len(images) == 1:
            opened = open_image(
                images[0], max_pixels=max_pixels, target=spec.size, limit_name=PIXELS_SETTING
            )
            held.admit(1, deadline)  # shed before paying for decoding
            cost = decode_cost(opened)
            if self._decodes_inline(images[0], cost):
                image = preprocess_opened(opened, spec)
                if time.monotonic() > deadline:
                    raise DeadlineExceeded("the request deadline passed while decoding images")
                return image[None]
            self._admit_decode(target.model)
            items, work = [opened], _decode_work(images[0], cost)
            big = work if _big(opened) else 0
            del opened  # the list's reference only: see below
        else:
            # Shed before reading every header too: 32 images' headers cost a loaded
            # worker's event loop ~13% of its time when most such requests were refused.
            self._admit_decode(target.model)
            held.admit(len(images), deadline)
            items, work, big = self._open_all(images, spec, max_pixels, names)
        self._admit_big(target.model, big)
        loop = asyncio.get_running_loop()
        abandoned = threading.Event()  # the request no longer waits for its images
        decode = functools.partial(_timed_decode, spec=spec, abandoned=abandoned)
        began, foreseen = time.monotonic(), self._decode_ahead(work)
        jobs = [self._pool.submit(decode, item) for item in items]
        # Each opened image is let go as its decode ends, not as the request's does: a
        # WebP's decoder keeps its canvas (~12 bytes a pixel) until the image goes, and
        # two 6000x6000 WebPs in one request held both, +1,061 MB against +553 for one.
        items.clear()
        self._count_while_decoding(jobs, len(images), work, big, loop)
        futures = [asyncio.wrap_future(job, loop=loop) for job in jobs]
        gathered = asyncio.gather(*futures)
        # Cancelled (the client left) or timed out, its error is read by no one: read it
        # here, or asyncio logs "exception was never retrieved" at ERROR for each call.
        gathered.add_done_callback(_read_outcome)
        try:
            results = await asyncio.wait_for(gathered, max(0.0, deadline - time.monotonic()))
            decoded = [image for image, _ in results]
            self._note_decode_speed(sum(seconds for _, seconds in results) / work)
            now = time.monotonic()
            self._decode_waits.note(now - began, foreseen, now)
        except TimeoutError:
            raise DeadlineExceeded("the request deadline passed while decoding images") from None
        except CnnserveError as exc:
            if len(images) == 1:
                raise
            bad = next(i for i, f in enumerate(futures) if f.done() and f.exception() is exc)
            # The others: those not begun are dropped, those decoding waited for (within
            # the deadline), so that the answer frees the threads the request took. A
            # client resending at once found them still busy with its last request's
            # images: ~400 ms of decoding ahead, refused 503.
            abandoned.set()  # big ones waiting for their turn do not take it
            for job in jobs:
                job.cancel()
            await asyncio.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
            raise _naming(exc, bad, names) from None
        finally:
            abandoned.set()
        return decoded[0][None] if len(decoded) == 1 else np.stack(decoded)

    def _count_while_decoding(
        self,
        jobs: Sequence[concurrent.futures.Future[Any]],
        images: int,
        work: int,
        big: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Count ``jobs`` (one request's ``images`` on the decode threads, ``work`` and
        ``big`` their decode work, :func:`_decode_work`) as decoding from now until the
        last of them has run or was cancelled before it began, not until the request
        stops waiting for them: a decode whose request's deadline passed runs on
        to its end. Counted until the request gave up, such decodes left admission seeing
        idle threads while both were busy: a client sending 34-byte WebPs of 6000x6000
        with a 50 ms deadline got only 504s, never a 503, and a client beside it waited
        a median 609 ms instead of 14 (an outside audit)."""
        self._decoding += images
        self._decoding_work += work
        self._decoding_big += big
        left = len(jobs)

        def one_done() -> None:  # on the event loop
            nonlocal left
            left -= 1
            if left == 0:
                self._decoding -= images
                self._decoding_work -= work
                self._decoding_big -= big

        def done(_: concurrent.futures.Future[Any]) -> None:  # on any thread
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to count
                loop.call_soon_threadsafe(one_done)

        for job in jobs:
            job.add_done_callback(done)

    def check_room(
        self,
        model: str | None,
        version: int | None,
        label: str | None,
        deadline: float,
        client_key: str | None = None,
    ) -> None:
        """Overloaded (or DeadlineExceeded) now when the version that would answer would
        refuse even one more image, before the request's body is parsed: parsing a
        32-image multipart body took a loaded worker's event loop a quarter of its time,
        mostly for requests then refused. A name that does not resolve is left to the
        request's own routing to report, in its turn. The decode threads' backlog too:
        a lone small image would be decoded on the event loop, without them, but on the
        cores they are short of (without it, 16-image requests at 4x on a model cheap
        beside decoding: admitted p99 289-411 ms against 189-243, goodput 640-908 images
        a second against 768-1,224). A raw-body image the HTTP protocol answers itself
        is not checked here (service.api.direct_classify)."""
        try:
            target = self.route(model, version, label, client_key)
        except CnnserveError:
            return
        self._admit_decode(target.model)
        target.batcher.check(1, deadline)

    def _decodes_inline(self, data: bytes, cost: int) -> bool:
        """Whether a lone image is cheap enough to decode on the event loop: few pixels
        to decode (``cost``: a progressive JPEG's scans counted, :func:`decode_cost`) in
        a small file. Pillow walks some files' chunks in Python as it decodes (a PNG's
        after its image data), so a big file of few pixels could still hold the loop for
        seconds; and a JPEG's cost follows its bytes (:data:`INLINE_DECODE_MAX_BYTES`)."""
        cheap = cost <= self.settings.inline_decode_max_pixels
        return cheap and len(data) <= INLINE_DECODE_MAX_BYTES

    def _open_all(
        self,
        images: Sequence[bytes],
        spec: PreprocessSpec,
        max_pixels: int,
        names: Sequence[str | None],
    ) -> tuple[list[Opened], int, int]:
        """Every image's header, read here (tens of µs each), and the pixels they will
        decode to (:func:`~service.preprocessing.request_cost`) in all bounded by
        ``max_request_pixels``: each image may be under the
        per-image limit while their sum is not (64 GIFs of 42 bytes, each declaring a
        6000×6000 screen, cost 4 s of CPU); and their decode work in all
        (:func:`_decode_work`)."""
        opened, total, work, big = [], 0, 0, 0
        for i, data in enumerate(images):
            try:
                image = open_image(
                    data, max_pixels=max_pixels, target=spec.size, limit_name=PIXELS_SETTING
                )
            except CnnserveError as exc:
                raise _naming(exc, i, names) from None
            opened.append(image)
            total += request_cost(data, image)
            own = _decode_work(data, decode_cost(image))
            work += own
            big += own if _big(image) else 0
        limit = self.settings.max_request_pixels
        if total > limit:
            raise ImageTooLarge(
                f"the {len(images)} images decode to {total} pixels in all; the limit for "
                f"one request is {limit} (CNNSERVE_MAX_REQUEST_PIXELS)"
            )
        return opened, work, big

    def _admit_decode(self, model: str) -> None:
        """Shed at once when the images already waiting for the decode pool (their work
        in pixels, :func:`_decode_work`) would take longer than the queue-wait budget to
        decode (no lock: the event loop's own counters). A request's own images are not
        counted: decoding them is not a wait, and what they add is counted against the
        requests behind them. Counting them too (once foreseen from their number before
        the headers were read, once from the headers) cut the goodput of 16-image
        requests at 4x to ~55% of capacity from ~90% (4 alternating runs of
        tests/reliability/test_overload.py's many-image test: 944-1,104 images/s
        against 1,396-1,704), and their admitted p99 rose to 194-264 ms from 138-144."""
        # Fewer images waiting than threads to decode them are always admitted: none of
        # them waits for a thread, however slow the moment (a lone huge image is served).
        if self._decoding < self._decode_threads:
            return
        self._shed_past_budget(model, self._decoding_work / self._decode_threads, "images")

    def _admit_big(self, model: str, big: int) -> None:
        """Shed a request with images over BIG_DECODE_PIXELS when the big ones already
        decoding or waiting would take longer than the budget: they decode one at a
        time, whatever the threads (divided by the threads, such requests were admitted,
        then waited past their deadline for their turn)."""
        if big and self._decoding_big:
            self._shed_past_budget(model, self._decoding_big, "large images, one at a time,")

    def _shed_past_budget(self, model: str, work: float, what: str) -> None:
        """Overloaded when ``work`` pixels of decode work ahead (for one thread) take
        longer than the queue-wait budget, at the measured pace and its correction."""
        per_pixel = self._decode_per_pixel or UNMEASURED_DECODE_SECONDS_PER_PIXEL
        ahead = work * per_pixel * self._decode_waits.factor(time.monotonic())
        budget = self.settings.queue_wait_budget_seconds
        if ahead > budget:
            metrics.observe_shed(model, "decode_queue")
            raise Overloaded(
                f"server is at capacity (~{ahead * 1e3:.0f} ms of {what} wait to be decoded; "
                f"budget {budget * 1e3:.0f} ms); retry after the Retry-After delay "
                f"({Overloaded.retry_after} s) or send to another replica",
                reason="decode_queue",
            )

    def _decode_ahead(self, work: int) -> float:
        """Seconds of decoding (in the threads' CPU time) before ``work`` more pixels of
        decode work (:func:`_decode_work`), submitted now, are decoded; 0 unmeasured."""
        if self._decode_per_pixel is None:
            return 0.0
        return (self._decoding_work + work) * self._decode_per_pixel / self._decode_threads

    def _note_decode_speed(self, seconds: float) -> None:
        previous = self._decode_per_pixel
        self._decode_per_pixel = (
            seconds if previous is None else previous + COST_WEIGHT * (seconds - previous)
        )

    async def classify(
        self,
        images: Sequence[bytes],
        *,
        model: str | None = None,
        version: int | None = None,
        label: str | None = None,
        k: int | None = None,
        deadline: float,
        names: Sequence[str | None] = (),
        client_key: str | None = None,
    ) -> ClassifyResult:
        """``client_key`` keeps a client on one side of the canary split."""
        target = self.route(model, version, label, client_key)
        num_classes = target.runtime.info.num_classes
        k = min(DEFAULT_TOP_K, num_classes) if k is None else k
        if not 1 <= k <= num_classes:
            raise InvalidRequest(f"top_k must be between 1 and {num_classes}, got {k}")
        with metrics.in_flight(target.model), target.batcher.reserve() as held:
            started = time.perf_counter()
            batch = await self.decode(images, target, deadline, held, names)
            timings = {"decode": time.perf_counter() - started}
            pinned = version is not None or label is not None
            held.release()  # they are queued next, with no await between
            target, probabilities = await self._infer(
                target, batch, deadline, timings, pinned=pinned, client_key=client_key
            )
        self._observe(target, timings)
        return ClassifyResult(
            model=target.model,
            version=target.version,
            results=top_k(probabilities, k, target.labels),
            timings=timings,
        )

    # --- TF Serving Predict -------------------------------------------------------------

    async def predict(
        self,
        inputs: Mapping[str, Any],
        *,
        model: str | None,
        version: int | None = None,
        label: str | None = None,
        signature_name: str = "",
        output_filter: Sequence[str] = (),
        deadline: float,
        client_key: str | None = None,
    ) -> PredictResult:
        """TF Serving's Predict: named input tensors in, named output tensors out.

        ``serving_default`` takes the image tensor itself; ``predict_image_bytes`` takes
        encoded images, which are decoded by the same function as /v1/classify.
        """
        target = self.route(model, version, label, client_key)
        signature = self.signature(target, signature_name)
        info = target.runtime.info
        if not signature_name and _encoded_images(inputs):
            # TF Serving clients send {"b64": ...} files without naming the bytes
            # signature; the image tensor cannot hold them, so route them there: named
            # as either signature's input (a row of {"zzz": ...} was refused, the same
            # files under "inputs" served).
            name = next(iter(inputs))
            if name not in (info.input_name, BYTES_INPUT_NAME):
                raise InvalidRequest(
                    f"encoded image files go in input {info.input_name!r} (or "
                    f"{BYTES_INPUT_NAME!r}, signature {BYTES_SIGNATURE!r}); got {name!r}"
                )
            signature = BYTES_SIGNATURE
            inputs = {BYTES_INPUT_NAME: inputs[name]}
        with metrics.in_flight(target.model), target.batcher.reserve() as held:
            started = time.perf_counter()
            # Off the event loop: JSON's nested lists become arrays, large arrays are
            # checked and cast.
            if signature == BYTES_SIGNATURE:
                raw = self._only_input(inputs, BYTES_INPUT_NAME, signature)
                items = await _off_loop_if_large(_encoded_items, raw)
                if not items:  # (decode's own message names /v1/classify's fields)
                    raise InvalidRequest(
                        f"input {BYTES_INPUT_NAME!r} holds no image; send at least one "
                        "encoded image file"
                    )
                batch = await self.decode(items, target, deadline, held)
            else:
                value = self._only_input(inputs, info.input_name, signature)
                batch = await _off_loop_if_large(lambda v: self._image_tensor(v, target), value)
            _check_output_filter(output_filter, info.output_name)
            timings = {"decode": time.perf_counter() - started}
            pinned = version is not None or label is not None
            held.release()  # they are queued next, with no await between
            target, probabilities = await self._infer(
                target, batch, deadline, timings, pinned=pinned, client_key=client_key
            )
        outputs = {target.runtime.info.output_name: probabilities}
        self._observe(target, timings)
        return PredictResult(
            model=target.model,
            version=target.version,
            outputs=outputs,
            timings=timings,
            signature=signature,
        )

    async def _infer(
        self,
        target: LoadedVersion,
        batch: Any,
        deadline: float,
        timings: dict[str, float],
        *,
        pinned: bool,
        client_key: str | None,
    ) -> tuple[LoadedVersion, Any]:
        """``target``'s answer; when the model backend dropped that version before this
        gateway noticed (TF Serving unloads on its own poll) and the request named none,
        the version the routes give after a rescan, if it takes the same input."""
        shape = (target.runtime.info.input, target.runtime.info.num_classes)
        try:
            return target, await target.predict(batch, deadline, timings)
        except VersionGone:
            if pinned:
                raise
            await self.registry.refreshed()  # the gone version may unload meanwhile
            again = self.route(target.model, client_key=client_key)
            now = again.runtime.info
            if again is target or (now.input, now.num_classes) != shape:
                raise
            return again, await again.predict(batch, deadline, timings)

    def route(
        self,
        model: str | None,
        version: int | None = None,
        label: str | None = None,
        client_key: str | None = None,
    ) -> LoadedVersion:
        """The version that answers an inference request, the canary split included."""
        return self._resolve(model, version, label, split=True, client_key=client_key)

    def _resolve(
        self,
        model: str | None,
        version: int | None,
        label: str | None,
        *,
        split: bool = False,
        client_key: str | None = None,
    ) -> LoadedVersion:
        """The version that answers, noted on the current request (metrics, access log).

        When none can answer, a configured model is still noted (its 503s and 404s
        belong to it); a name that is not configured is not, so clients cannot add
        label values."""
        # TF Serving serves a version 0 folder; a negative number is a NOT_FOUND there
        # (over gRPC; REST's paths take digits only), a bad request here on every API.
        if version is not None and version < 0:
            raise InvalidRequest(f"version must be 0 or more, got {version}")
        # "?model=" means the default, as an empty gRPC field does; "?label=" no label.
        model, label = model or None, label or None
        try:
            target = self.registry.resolve(
                model, version, label, split=split, client_key=client_key
            )
        except CnnserveError:
            name = model if model is not None else self.registry.default_model
            if name is not None and name in self.registry.model_names():
                note_target(name, None)
            raise
        note_target(target.model, target.version)
        return target

    @staticmethod
    def _observe(target: LoadedVersion, timings: dict[str, float]) -> None:
        # queue_wait, inference and the predicted classes are observed by the batcher.
        metrics.observe_stage(target.model, "decode", timings["decode"])
        note_timings(timings)

    @staticmethod
    def _only_input(inputs: Mapping[str, Any], name: str, signature: str) -> Any:
        if set(inputs) != {name}:
            raise InvalidRequest(
                f"signature {signature!r} takes one input named {name!r}, got {sorted(inputs)}"
            )
        return inputs[name]

    def _image_tensor(self, value: Any, target: LoadedVersion) -> npt.NDArray[np.uint8]:
        spec = target.runtime.info.input
        try:
            # A large REST body's pixel lists are arrays already where they could be
            # (tfserving_rest._as_arrays, pixel_array): lists here are small, or ones
            # pixel_array left to np.asarray.
            array = np.asarray(value)
        except ValueError:
            raise InvalidRequest("the image tensor is ragged; every image must be HxWx3") from None
        expected = (spec.height, spec.width, 3)
        if array.dtype.kind == "O" and not _all_text(array):
            # numpy keeps what is no number as objects: null, {}, an integer past int64
            # (their refusal said "send encoded images", as for files).
            for value in array.flat:
                if _not_a_pixel(value):
                    shown = bounded(repr(value), 40)
                    raise InvalidRequest(
                        f"image values must be integers 0-255 (uint8 RGB); got {shown}"
                    )
            array = array.astype(np.float64)
        if array.dtype.kind in "SU" and (text := _text_among_numbers(value)) is not None:
            # numpy turned the numbers into strings too: name the string, not files
            raise InvalidRequest(
                f"image values must be integers 0-255 (uint8 RGB); got {bounded(repr(text), 40)}"
            )
        if array.dtype.kind in "OSU":  # files, named to the tensor signature
            raise InvalidRequest(
                f"signature {SERVING_SIGNATURE!r} takes decoded pixels [N, {spec.height}, "
                f"{spec.width}, 3] (uint8 RGB); send encoded images (JPEG, PNG, …) to "
                f"signature_name {BYTES_SIGNATURE!r}, or leave signature_name out"
            )
        if array.ndim != 4 or array.shape[1:] != expected:
            raise InvalidRequest(
                f"image tensor has shape {list(array.shape)}; expected [N, {spec.height}, "
                f"{spec.width}, 3] (RGB, uint8 0-255)"
            )
        self.check_image_count(array.shape[0])
        if array.dtype == np.uint8:
            return array
        if array.dtype.kind == "b":
            raise InvalidRequest("image values must be numbers 0-255 (uint8 RGB), not booleans")
        if array.dtype.kind == "f" and not np.isfinite(array).all():  # NaN passes min/max
            raise InvalidRequest("image values must be integers 0-255 (uint8 RGB); got NaN or inf")
        if array.dtype.kind not in "iuf" or (array.size and (array.min() < 0 or array.max() > 255)):
            raise InvalidRequest("image values must be integers 0-255 (uint8 RGB)")
        if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
            raise InvalidRequest("image values must be integers 0-255 (uint8 RGB); got a fraction")
        return array.astype(np.uint8)

    async def reload_config(self, text: str) -> None:
        """Apply a whole models.config (TF Serving's HandleReloadConfigRequest), when the
        settings allow it."""
        if not self.settings.reload_config_rpc:
            raise MethodNotAllowed(
                "HandleReloadConfigRequest is off on this server (CNNSERVE_RELOAD_CONFIG_RPC); "
                "edit models.config in the model repository instead (`cnnserve promote` does it "
                "safely); the server re-reads it every poll"
            )
        await self.registry.reload_config(text)

    # --- status and metadata -----------------------------------------------------------

    def model_status(self, model: str, version: int | None = None) -> list[VersionStatus]:
        statuses = self.registry.statuses(model, version)
        if not statuses:
            # TF Serving: NOT_FOUND "Could not find any versions of model"; an empty
            # list read as a model that is fine, and pollers indexing [0] crashed.
            raise VersionNotFound(
                f"could not find any versions of model {model!r}: none is published in its "
                "folder, or none that its version policy serves (the server log says which)"
            )
        return statuses

    def refuse_tf_example_api(
        self, api: str, model: str, version: int | None = None, label: str | None = None
    ) -> InvalidRequest:
        """TF Serving's Classify/Regress/MultiInference (tf.Example input) for a model: as
        TF Serving, an unknown model or version is NOT_FOUND first; a served one has no
        signature of that kind, INVALID_ARGUMENT."""
        target = self._resolve(model, version, label)
        return InvalidRequest(
            f"{api}: {target.model} has no {api.lower()} signature (tf.Example input); its "
            f"signatures take images: POST them to :predict ({SERVING_SIGNATURE}, or "
            f"{BYTES_SIGNATURE} for encoded files), or an image file to /v1/classify"
        )

    def metadata(
        self, model: str, version: int | None = None, label: str | None = None
    ) -> tuple[LoadedVersion, Any]:
        target = self._resolve(model, version, label)
        return target, target.runtime.signature_defs()

    @staticmethod
    def signature(target: LoadedVersion, name: str = "") -> str:
        """The signature a Predict names (default: serving_default), if this version serves
        it: the image tensor one, or the encoded-bytes one."""
        signature = name or SERVING_SIGNATURE
        if signature not in (SERVING_SIGNATURE, BYTES_SIGNATURE):
            # The ones a Predict can run: not the graph's init op, which metadata lists.
            known = ", ".join(sorted({SERVING_SIGNATURE, BYTES_SIGNATURE}))
            raise UnknownSignature(
                f"unknown signature_name {signature!r}; this model serves: {known}"
            )
        return signature

    def signature_inputs(self, target: LoadedVersion, name: str = "") -> list[str]:
        """Input names of the signature a Predict names (for parsing TF Serving's row
        format); raises InvalidRequest for a signature this version does not serve."""
        signature = self.signature(target, name)
        defs = target.runtime.signature_defs().signature_def
        if signature in defs:  # a lookup of a missing key would add it to the model's map
            return sorted(defs[signature].inputs)
        # A backend's model without the bytes signature: the gateway decodes for it.
        return [
            BYTES_INPUT_NAME if signature == BYTES_SIGNATURE else target.runtime.info.input_name
        ]


def _check_output_filter(output_filter: Sequence[str], output: str) -> None:
    """Before inference, not after paying for it; a name twice is TF Serving's
    INVALID_ARGUMENT "duplicate output tensor alias" (it was answered)."""
    for name in output_filter:
        if name != output:
            raise InvalidRequest(f"output_filter names {name!r}; the output is {output!r}")
    if len(output_filter) > len(set(output_filter)):
        raise InvalidRequest(f"duplicate output tensor alias in output_filter: {output!r}")


def _naming(exc: CnnserveError, index: int, names: Sequence[str | None]) -> CnnserveError:
    """``exc`` again, its message saying which image of a list it is about."""
    name = names[index] if index < len(names) else None
    which = f"image {index}" + (f" ({name!r})" if name else "")
    return type(exc)(f"{which}: {exc.message}", detail=exc.detail)


def _decode_work(data: bytes, cost: int) -> int:
    """What decoding an image of ``data`` costs the decode threads, in pixels: its
    ``cost`` (:func:`~service.preprocessing.decode_cost`), or its bytes where they
    outweigh it (:data:`DECODE_BYTES_PER_PIXEL`), and a share per image."""
    return max(cost, len(data) // DECODE_BYTES_PER_PIXEL) + DECODE_PIXELS_PER_IMAGE


# Images that decode to more pixels than this take turns, one at a time in a worker: a
# lossless WebP of 40M pixels peaks at ~550 MB while Pillow decodes it (a 16-bit RGBA PNG
# ~300 MB), and one on each decode thread of each of a pod's two workers (4 small
# requests) went past the 2 GiB the Kubernetes gateway may take (an outside audit, 12-07).
BIG_DECODE_PIXELS = 16_000_000
_BIG_DECODE = threading.Lock()
_TRIM = malloc_trim()


def _big(opened: Opened) -> bool:
    """Whether ``opened`` decodes to more than BIG_DECODE_PIXELS (a JPEG at its reduced
    scale): such images decode one at a time in a worker."""
    width, height = opened.size
    return width * height > BIG_DECODE_PIXELS


class _Abandoned(Exception):
    """A big image's turn came after its request stopped waiting for it (read by no one)."""


# How often a big image waiting for its turn looks whether its request still waits.
BIG_WAIT_POLL_SECONDS = 0.05


def _timed_decode(
    opened: Opened, spec: PreprocessSpec, abandoned: threading.Event | None = None
) -> tuple[npt.NDArray[np.uint8], float]:
    """On a decode thread: the image (opened by :func:`service.preprocessing.open_image`
    on the event loop), and the CPU seconds its decoding took. CPU time, not wall time:
    under overload the decode threads wait for the GIL behind the event loop, and
    counting that wait as work would shed more, which loads the loop more (a storm of
    503s feeding itself). A big image waits for the one before it (BIG_DECODE_PIXELS),
    and is not decoded once ``abandoned`` is set (its request answered 504 or 400, or
    its client gone): a job waiting for the lock is running as far as its pool knows,
    and cancelling it did nothing."""
    if not _big(opened):
        return _measured(opened, spec)
    while not _BIG_DECODE.acquire(timeout=BIG_WAIT_POLL_SECONDS):
        if abandoned is not None and abandoned.is_set():
            raise _Abandoned
    try:
        if abandoned is not None and abandoned.is_set():
            raise _Abandoned
        return _measured(opened, spec)
    finally:
        # Pillow's blocks of the image, freed into this thread's malloc arena, stay
        # there (~150 MB after a 40M-pixel WebP) where the next big image, on the
        # other decode thread's arena, cannot reuse them: handed back at once.
        if _TRIM is not None:
            _TRIM()
        _BIG_DECODE.release()


def _measured(opened: Opened, spec: PreprocessSpec) -> tuple[npt.NDArray[np.uint8], float]:
    began = time.thread_time()
    image = preprocess_opened(opened, spec)
    return image, time.thread_time() - began


def _read_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


# Lists of more elements than this are converted in one step (see pixel_array): far
# more than a batch of images holds (CNNSERVE_MAX_IMAGES_PER_REQUEST: 64 by default).
MAX_PIXEL_PARTS = 1024


def pixel_array(value: Any) -> npt.NDArray[Any] | None:
    """JSON's nested lists of numbers as the array np.asarray makes of them, converted an
    element at a time: numpy holds the GIL while it converts, ~90 ms for 10 MB of pixel
    lists at once, a few ms an image. None unless every element converts to numbers of
    one dtype and shape (then the whole is what np.asarray makes of it; for anything
    else np.asarray's own reading is needed, and the refusals that name what is
    wrong)."""
    if not isinstance(value, list) or not value:
        return None
    if len(value) > MAX_PIXEL_PARTS or not isinstance(value[0], list):
        # Numbers, or more elements than a batch has images: one step, not one per
        # element (3M empty lists as 3M arrays took a worker +1 GB).
        whole = np.asarray(value)
        return whole if whole.dtype.kind in "iuf" else None
    parts: list[npt.NDArray[Any]] = []
    for item in value:
        part = np.asarray(item)  # ValueError when ragged, as for the whole
        if part.dtype.kind not in "iuf" or (
            parts and (part.dtype != parts[0].dtype or part.shape != parts[0].shape)
        ):
            return None
        parts.append(part)
    return np.stack(parts)


# An array of at least this many values other than uint8 is checked and cast off the
# event loop: an image's worth (224x224x3). The checks of 12 images of floats (finite,
# in range, whole) took ~10 ms of the loop.
LARGE_ARRAY_VALUES = 150_528


async def _off_loop_if_large(convert: Callable[[Any], T], value: Any) -> T:
    """``convert(value)``, in a thread when ``value`` is a list (JSON's) or a large array
    that is not uint8 already (a gRPC tensor, or REST's lists made arrays)."""
    if isinstance(value, list) or (
        isinstance(value, np.ndarray)
        and value.dtype != np.uint8
        and value.size >= LARGE_ARRAY_VALUES
    ):
        return await asyncio.to_thread(convert, value)
    return convert(value)


def _encoded_images(inputs: Mapping[str, Any]) -> bool:
    """Whether a Predict's only input holds encoded files (bytes), not pixels: REST's
    decoded {"b64": ...} values, or a gRPC DT_STRING tensor. Any file among its values
    counts: a list of files and a null is refused by :func:`_encoded_items`, naming the
    null (read as pixels, the refusal quoted a kilobyte of the file)."""
    if len(inputs) != 1:
        return False
    value = next(iter(inputs.values()))
    if isinstance(value, np.ndarray):
        items = list(value.reshape(-1)) if value.dtype == object else []
    else:
        items = value if isinstance(value, list) else [value]
    return any(isinstance(item, bytes) for item in items)


def _encoded_items(raw: Any) -> list[bytes]:
    """The files a Predict on the bytes signature sends, a list ``[batch]`` (or one
    file); anything but bytes is refused (``bytes(12)`` would be twelve zero bytes,
    ``bytes(1.5)`` a TypeError), as is a tensor of files in more dimensions."""
    if isinstance(raw, np.ndarray) and raw.dtype != object:
        raise InvalidRequest(
            f"{BYTES_SIGNATURE} takes encoded image files (a DT_STRING tensor), not a "
            f"{raw.dtype} tensor; send pixels to {SERVING_SIGNATURE}"
        )
    if isinstance(raw, bytes):
        return [raw]
    files = np.asarray(raw, dtype=object)
    if files.ndim > 1:
        # As TF Serving, whose input is [batch]: a [1, 1, ..., 1] tensor (or 40 nested
        # lists around one file) was read as one file.
        raise InvalidRequest(
            f"{BYTES_SIGNATURE} takes a list of encoded image files, shape [batch]; got "
            f"shape {list(files.shape)}"
        )
    items = list(files.reshape(-1))
    for i, item in enumerate(items):
        if not isinstance(item, bytes):
            raise InvalidRequest(
                f'{BYTES_SIGNATURE} takes encoded image files ({{"b64": ...}} over REST, '
                f"DT_STRING over gRPC); value {i} is {_json_kind(item)}"
            )
    return items


def _json_kind(value: Any) -> str:
    """What a decoded JSON value is, in JSON's words (``NoneType`` told REST clients
    little)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return 'a string (files are sent as {"b64": ...})'
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _all_text(array: npt.NDArray[Any]) -> bool:
    return all(isinstance(v, str | bytes) for v in array.flat)


def _text_among_numbers(value: Any) -> str | bytes | None:
    """The first string in nested lists that hold numbers too (pixel values with a
    string among them); None when there is no number (files) or no string."""
    text: str | bytes | None = None
    number = False
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list | tuple):
            stack.extend(reversed(item))
        elif isinstance(item, str | bytes):
            text = item if text is None else text
        elif isinstance(item, int | float):
            number = True
        if number and text is not None:
            return text
    return None


def _not_a_pixel(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return True
    return not 0 <= value <= 255  # NaN too
