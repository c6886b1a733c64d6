"""Dynamic batching in front of one loaded model version.

Requests queue in arrival order and leave it as whole batches. A batch is cut when
max_batch_size images are queued or when the oldest request has waited
batch_timeout_micros, whichever comes first: the timeout caps the latency a lone
request pays for the throughput of a full batch. Cutting only starts once a batch
thread is free, so under load requests pile up into larger batches instead of a
backlog of small ones.

Admission is by latency budget, not only by count. The batcher keeps a moving average
of measured inference seconds per image; a request is refused at once (Overloaded, a
503 with Retry-After) when the images queued or in inference ahead of it would take
longer than ``queue_wait_budget_seconds`` to clear (reason ``queue_budget``; never
while less than one batch is ahead), or longer
than what is left of its deadline together with its own images (reason ``deadline``):
queued behind that much work it would only time out later, holding memory meanwhile.
Callers ask before they decode (:meth:`DynamicBatcher.reserve`), and the images admitted
so are counted ahead of later requests until they are queued: a request of 32 images
decodes for tens of ms, and uncounted, sixteen of them passed admission together, all
reached the queue at once past the budget, and most were refused there with their
decoding already paid for (goodput fell to a fifth of what the same requests got at a
quarter of the load; docs/failure-modes.md "Requests of many images").
One whose own images alone are expected to outlast its deadline gets DeadlineExceeded at
once, but only while a batch confirmed the estimate lately (ESTIMATE_FRESH_SECONDS): an
estimate left over from a slow moment refused every short deadline, so nothing ran to
measure that the moment was over. One batch moves the estimate by a bounded step
(OUTLIER_FACTOR), so a single slow answer cannot poison it.
The queue is also bounded in items (max_enqueued_batches full batches, reason
``queue_full``), a hard cap that holds before the first measurement. The check is a few
arithmetic operations on the event loop, with no lock. Deadlines are checked again when
a batch is cut, so expired requests never cost inference.

Where batches run: on a batch thread, or, when the runtime computes on the calling
thread alone (``inline``: LiteRT with one thread) and a full batch (max_batch_size) is
estimated to take at most ``inline_max_seconds``, on the event loop itself. A batch
thread costs two hand-offs per batch (the loop wakes the thread, the thread wakes the
loop through its self-pipe) and the GIL going back and forth between them; for a cheap
model that is a good part of what the batch costs. For an expensive one the thread pays
(the loop reads, parses and decodes the next requests while a batch computes), and
batches split between the loop and a thread cost more still (each thread has its own
interpreters, so the model's packed weights are in the caches twice). So the choice is
per version, by its full batch, not per batch. Measured side by side (photo mix, 2
workers, 32 connections, 4 rounds): the default model (0.3 ms per image) on the loop
+6% req/s and p99 -20% (4 of 4); MobileNetV3-Small (1.4 ms per image) with batches on
the loop up to 3 or 10 ms -8% to -12%. The bound also caps how long the loop stalls
(what it delays, reading, timers, probes, waits at most that long, and the event-loop
lag the concurrency limit watches sees it). Before the first batch was timed, batches
go to the thread. Once on the loop, a version's batches return to the thread only past
INLINE_HYSTERESIS times the bound, so an estimate near it does not split them. That
estimate is of CPU time (the computing thread's), not wall time: with workers and a
load generator sharing the cores, a batch the OS preempted took longer by the wait, the
same on the loop or a thread, and a few of those had sent the default model's batches to
the thread now and then (9% of its inference time there, its weights in two interpreters).
While the worker refuses requests for load (``shedding``: service.concurrency), a
refusal arriving during a batch on the loop waited for it (a polite client's 503 p50
10-19 ms at 4x the load against ~2 ms). Such batches run on the loop a step at a time
(``steps``: LiteRT's chunks of MAX_CHUNK images, 0.6-1 ms), yielding to the loop between
steps once they took STEP_SECONDS, so a refusal waits for a step, not a batch; one such
batch at a time, as on the loop. Sent to the thread instead, as they were, they cost
goodput the hand-offs: an open loop at 4x got 59-66% of capacity against 66-68% in steps
(docs/failure-modes.md "Batches in steps while shedding"). A runtime without steps of
its own makes one step of the whole batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from time import monotonic, perf_counter, thread_time
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from service.config import Settings
from service.errors import (
    CnnserveError,
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    ModelNotReady,
    Overloaded,
    TooManyImages,
)
from service.runtimes.base import BatchDeadline

Array = npt.NDArray[Any]
# Weight of the newest batch in the moving average of seconds per image: the estimate
# follows a change of load or machine within ~10 batches, and one slow batch (a GC
# pause, a noisy neighbour) moves it by a fifth of the difference only, and by a fifth
# of the estimate at most (OUTLIER_FACTOR).
COST_WEIGHT = 0.2
# A batch's seconds per image count for at most this multiple of the estimate, so one
# batch moves it up by a fifth at most (COST_WEIGHT x (2 - 1)). Unbounded, one answer
# delayed 0.6 s (a TF Serving behind a stalled proxy) took the default model's estimate
# from 15 to 373 ms per image, and every request with a deadline under that was refused.
# A lasting slowdown still takes it up x1.2 a batch: x10 in 13 batches.
OUTLIER_FACTOR = 2.0
# An estimate that no batch confirmed for this long refuses no request for its own
# inference time: it may describe a slowness that is over, and refusing every request
# with a deadline under it left nothing to run and say so (still refused 5 s after a
# backend was fast again, in a review). Such a request runs and re-measures; a faster
# measure then replaces the estimate rather than moving it by COST_WEIGHT.
ESTIMATE_FRESH_SECONDS = 1.0
# Admission's estimates of a wait (images ahead times seconds per image) are corrected
# by how long such waits lately took (Correction): for batches the estimate leaves out
# what slows them between them (an event loop busy reading and decoding other requests,
# which the batch threads wait for; the cores shared with decoding), and requests of 32
# images at 4x waited a median 126-173 ms where the budget's 80 was foreseen. One wait
# per batch counts, when MIN_FORESEEN_SECONDS or more was foreseen; the correction is
# bounded by MAX_WAIT_FACTOR either way, and dropped when nothing confirmed it for
# ESTIMATE_FRESH_SECONDS (the load went away).
MIN_FORESEEN_SECONDS = 0.010
MAX_WAIT_FACTOR = 10.0
# A batcher whose admission refused a request for load this recently keeps its batches off the
# event loop (as service.concurrency's SHEDDING_SECONDS does for the worker's refusals):
# a batch on the loop held the next refusals for its whole length (requests of 32 images
# at 4x: the 1-image client's 503 p50 21 ms against 6).
SHEDDING_SECONDS = 1.0
# Once a version's batches run on the event loop, they go back to a batch thread only
# when a full batch is estimated past this multiple of the bound. The estimate is wall
# time and moves with load: the default model on a host where a full batch came to
# 17-26 ms against the 20 ms bound went back and forth between the loop and the thread
# batch by batch, the worst of both (see the module's doc).
INLINE_HYSTERESIS = 1.5
# A batch in steps (while the worker sheds) gives the loop its turn once its steps took
# this much CPU: a refusal waits about this long for a batch. Each turn costs what the
# loop does per turn, shared by the refusals that came meanwhile: an open loop at 4x
# (one worker, the default model) got 62% of capacity in 3 of 3 runs with a turn after
# every step (MAX_CHUNK images, ~0.6 ms), 66-68% with one every 2 ms (polite 503 p50
# 4.7-4.8 ms), 66-70% every 4 ms (6-9 ms), the open loop's refusals held for the level
# (not let go by the pace check) in 1 run of 4 at 4 ms and 2 of 2 at 8 ms.
STEP_SECONDS = 0.002


class Placement(enum.Enum):
    """Where a batch runs: on the event loop at once, on it a step at a time (while the
    worker sheds), or on a batch thread."""

    LOOP = "loop"
    STEPS = "steps"
    THREAD = "thread"


@dataclass(frozen=True)
class BatchingConfig:
    """TF Serving's BatchingParameters, the subset this batcher honours."""

    max_batch_size: int
    batch_timeout_micros: int
    max_enqueued_batches: int
    num_batch_threads: int
    # Seconds of queued inference a newcomer may wait behind; None = the item cap only.
    queue_wait_budget_seconds: float | None = None
    # Batches run on the event loop (when the batcher may: inline) while a full batch is
    # estimated to take at most this long; 0 = never.
    inline_max_seconds: float = 0.0

    def __post_init__(self) -> None:
        least = min(self.max_batch_size, self.max_enqueued_batches, self.num_batch_threads)
        if least < 1 or self.batch_timeout_micros < 0 or self.inline_max_seconds < 0:
            raise ValueError(f"invalid batching parameters: {self}")

    @property
    def queue_capacity(self) -> int:
        """Images the queue holds before submissions are refused."""
        return self.max_enqueued_batches * self.max_batch_size

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchingConfig:
        return cls(
            max_batch_size=settings.max_batch_size,
            batch_timeout_micros=settings.batch_timeout_micros,
            max_enqueued_batches=settings.max_enqueued_batches,
            num_batch_threads=settings.num_batch_threads,
            queue_wait_budget_seconds=settings.queue_wait_budget_seconds,
            inline_max_seconds=settings.inline_inference_max_seconds,
        )


class BatchObserver(Protocol):
    """Where the metrics module hears about batches; called on the event loop."""

    def on_batch(self, size: int, outputs: Array) -> None:
        """A batch of ``size`` images ran; what the model answered for the whole batch."""

    def on_answered(self, queue_wait_seconds: float, inference_seconds: float) -> None:
        """A request's every chunk was answered: its queue wait and inference (of its
        slowest chunk), once per request however many batches it took."""

    def on_rejected(self, reason: str) -> None:
        """A submission was refused at admission: queue_full, queue_budget or deadline;
        or a request's batch was refused for load further on (a backend's shed:
        ``backend``), once per request (or chunk) it failed."""

    def on_cost(self, seconds_per_image: float) -> None:
        """The moving average of inference seconds per image changed."""

    def on_expired(self, count: int) -> None:
        """``count`` requests (or chunks) failed with DeadlineExceeded."""

    def on_queue_depth(self, depth: int) -> None:
        """The number of queued images changed."""

    def on_stopped(self) -> None:
        """The batcher stopped (its version unloads): its queue is gone."""


class NullObserver:
    """The default: metrics off."""

    def on_batch(self, size: int, outputs: Array) -> None: ...
    def on_answered(self, queue_wait_seconds: float, inference_seconds: float) -> None: ...
    def on_rejected(self, reason: str) -> None: ...
    def on_cost(self, seconds_per_image: float) -> None: ...
    def on_expired(self, count: int) -> None: ...
    def on_queue_depth(self, depth: int) -> None: ...
    def on_stopped(self) -> None: ...


@dataclass(eq=False)
class _Item:
    """One request, or one max_batch_size chunk of a larger one."""

    inputs: Array
    future: asyncio.Future[Array]
    deadline: float | None
    enqueued: float
    queued: bool = True
    started: float = 0.0  # when its batch went to the runtime
    foreseen: float = 0.0  # the wait admission estimated, before its Correction
    inference_seconds: float = 0.0

    @property
    def queue_wait(self) -> float:
        """Seconds from enqueue until its batch went to the runtime (once it has)."""
        return self.started - self.enqueued

    @property
    def key(self) -> tuple[np.dtype[Any], tuple[int, ...]]:
        return self.inputs.dtype, self.inputs.shape[1:]


class DynamicBatcher:
    """Batches concurrent ``submit`` calls into calls of a synchronous ``predict``, which
    gets the batch as its requests' inputs, in order, and answers for all their rows
    (``Runtime.predict_parts``: a runtime copies them into its own input)."""

    def __init__(
        self,
        predict: Callable[[list[Array], float | None], Array],
        config: BatchingConfig,
        *,
        steps: Callable[[list[Array]], Iterator[Array]] | None = None,
        observer: BatchObserver | None = None,
        name: str = "model",
        inline: bool = False,
        shedding: Callable[[], bool] | None = None,
    ) -> None:
        """``inline``: ``predict`` computes on the calling thread alone, so batches may run
        on the event loop while a full one is estimated within ``config.inline_max_seconds``
        and ``shedding`` (the worker is refusing requests for load) is false, and while it
        is true a step at a time when ``steps`` gives the batch's answers in pieces, in
        order, computing each as it is asked for (see the module's doc)."""
        self._predict = predict
        self._steps = steps
        self._stepping = asyncio.Lock()  # one batch in steps on the loop at a time
        self._inline_max = config.inline_max_seconds if inline else 0.0
        self._shedding = shedding
        self.config = config
        self.name = name
        self._observer: BatchObserver = observer or NullObserver()
        self._capacity = config.queue_capacity
        self._timeout = config.batch_timeout_micros / 1e6
        self._budget = config.queue_wait_budget_seconds
        # Moving average of inference seconds per image; None until a batch was timed.
        self._per_image: float | None = None
        # The same in CPU time of the computing thread: where batches run (_on_loop).
        self._cpu_per_image: float | None = None
        self._measured_at: float | None = None  # when a batch last confirmed them
        self._waits = Correction()  # requests' waits against what the estimate foresaw
        self._looping = False  # whether batches fit the bound (INLINE_HYSTERESIS)
        self._ran_on_loop = False  # where the last batch ran
        self._refused_at = -SHEDDING_SECONDS  # monotonic() of admission's last refusal
        self._queue: deque[_Item] = deque()
        self._depth = 0
        self._in_flight = 0
        self._reserved = 0  # admitted before decoding, not queued yet (Reservation)
        self._state = "new"
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(config.num_batch_threads)
        self._batches: set[asyncio.Task[None]] = set()
        self._scheduler: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def queue_depth(self) -> int:
        return self._depth

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def seconds_per_image(self) -> float | None:
        return self._per_image

    @property
    def reserved(self) -> int:
        """Images admitted before decoding (:meth:`reserve`) and not queued yet."""
        return self._reserved

    def seconds_ahead(self, reserved: bool = False) -> float:
        """Estimated seconds until the images queued or in inference now have run, and
        with ``reserved`` those admitted and still decoding, which will be queued first:
        their inference, corrected by how long requests lately waited against that."""
        return self._foreseen(reserved) * self._waits.factor(monotonic())

    def _foreseen(self, reserved: bool) -> float:
        """The images ahead times the estimated inference seconds per image."""
        if self._per_image is None:
            return 0.0
        # Batches on the event loop run one at a time, whatever the threads.
        threads = 1 if self._ran_on_loop else self.config.num_batch_threads
        return self._images_ahead(reserved) * self._per_image / threads

    def _images_ahead(self, reserved: bool) -> int:
        return self._depth + self._in_flight + (self._reserved if reserved else 0)

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"batcher for {self.name} was already started")
        self._executor = ThreadPoolExecutor(
            self.config.num_batch_threads, thread_name_prefix=f"batch-{self.name}"
        )
        self._scheduler = asyncio.get_running_loop().create_task(self._schedule())
        self._state = "running"

    async def stop(self) -> None:
        if self._state == "stopped":
            return
        self._state = "stopped"
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
        while self._queue:
            item = self._queue.popleft()
            item.queued = False
            if not item.future.done():
                item.future.set_exception(
                    ModelNotReady(f"model {self.name} is unloading; retry the request")
                )
        self._set_depth(-self._depth)
        # Batches already on a thread finish and answer their waiters.
        await asyncio.gather(*self._batches, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        self._observer.on_stopped()

    async def __aenter__(self) -> DynamicBatcher:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def submit(
        self, inputs: Array, *, deadline: float | None, timings: dict[str, float] | None = None
    ) -> Array:
        """Run ``inputs`` (batched on axis 0) through ``predict``; its rows of the output.

        ``timings``, when given, gets this request's ``queue_wait`` and ``inference``
        seconds (of its slowest chunk) for Server-Timing and the access log.
        """
        if self._state != "running":
            raise ModelNotReady(f"model {self.name} is not serving; retry the request")
        if not isinstance(inputs, np.ndarray) or inputs.ndim == 0 or len(inputs) == 0:
            raise InvalidRequest("a request needs at least one input, batched on axis 0")
        n = len(inputs)
        if n > self._capacity:
            raise TooManyImages(
                f"{n} inputs in one request; this model queues at most {self._capacity}"
            )
        now = monotonic()
        self._admit(n, now, deadline)
        loop = asyncio.get_running_loop()
        size = self.config.max_batch_size
        foreseen = self._foreseen(False)
        items = [
            _Item(inputs[i : i + size], loop.create_future(), deadline, now, foreseen=foreseen)
            for i in range(0, n, size)
        ]
        idle = not self._queue
        self._queue.extend(items)
        self._set_depth(n)
        # The scheduler needs waking only when there is something new to decide: a first
        # request (its timeout starts), a full batch, or the oldest one's timeout passed
        # (the loop was busy). Waking it for every arrival cost a task step and a
        # re-armed wait (~20 µs) per request for nothing.
        if (
            idle
            or self._depth >= self.config.max_batch_size
            or self._queue[0].enqueued + self._timeout <= now
        ):
            self._arrived.set()
        # A timer that fails the chunks at the deadline, rather than wait_for(gather(..)):
        # a request is nearly always one chunk, and those wrappers cost ~10 µs of the
        # event loop's time per request (~1% of it).
        timer = None
        if deadline is not None:
            timer = loop.call_later(max(0.0, deadline - monotonic()), _expire, items)
        parts: list[Array] = []
        try:
            while len(parts) < len(items):  # no loop variable: see the finally
                parts.append(await items[len(parts)].future)
            queue_wait = max(item.queue_wait for item in items)
            inference = max(item.inference_seconds for item in items)
            self._observer.on_answered(queue_wait, inference)
            if timings is not None:
                timings["queue_wait"] = queue_wait
                timings["inference"] = inference
        except TimeoutError:
            self._observer.on_expired(1)
            if any(not item.queued for item in items):
                # Cut into a batch: the runtime cannot be stopped mid-batch, so the
                # answer comes at the deadline and the batch's result is dropped.
                raise DeadlineExceeded(
                    "the request deadline passed while its batch ran; allow more time"
                ) from None
            raise DeadlineExceeded(
                "the request deadline passed while it waited for a batch"
            ) from None
        finally:
            if timer is not None:
                timer.cancel()
            self._abandon(items)
            # An error raised by a future holds this frame in its traceback, and this
            # frame held the future: a cycle that kept the request's arrays, and the
            # callers' frames (the version that answered, which then waited 10 s to
            # unload after leaving routing), until Python's cycle collector ran.
            items.clear()
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def check(self, n: int, deadline: float | None) -> None:
        """Raise Overloaded (or DeadlineExceeded) now if ``n`` images submitted now, behind
        those queued, running and reserved, would be refused."""
        if self._state == "running":
            self._admit(min(n, self._capacity), monotonic(), deadline, reserved=True)

    def reserve(self) -> Reservation:
        """An empty reservation: :meth:`Reservation.admit` checks a request's images
        before they are decoded and counts them ahead of later requests until
        :meth:`Reservation.release` (as they are queued, or the request fails)."""
        return Reservation(self)

    def _admit(self, n: int, now: float, deadline: float | None, reserved: bool = False) -> None:
        """Refuse ``n`` images at once if the work ahead cannot clear in time; with
        ``reserved``, images admitted and still decoding are ahead too. A request whose
        deadline passed is refused first, whatever is known of the work (a new worker's
        first request with a deadline already passed was decoded before it was refused)."""
        if deadline is not None and deadline <= now:
            self._observer.on_expired(1)
            raise DeadlineExceeded("the request deadline passed before it was queued")
        reason = None
        queued = self._depth + (self._reserved if reserved else 0)
        if queued + n > self._capacity:
            reason, why = "queue_full", f"{queued} inputs are queued"
        elif self._per_image is not None:
            ahead = self.seconds_ahead(reserved)
            # Less than a batch ahead is always admitted: it rides in the next batch, and
            # refusing it would turn a slow moment (a model loading beside) into errors.
            backlog = self._images_ahead(reserved) >= self.config.max_batch_size
            if self._budget is not None and backlog and ahead > self._budget:
                reason = "queue_budget"
                why = (
                    f"~{ahead * 1e3:.0f} ms of work is queued (budget {self._budget * 1e3:.0f} ms)"
                )
            elif deadline is not None and self._late(n * self._per_image, now, deadline, ahead):
                reason = "deadline"
                why = f"~{ahead * 1e3:.0f} ms of work is queued, more than the deadline leaves"
        if reason is None:
            return
        if reason != "deadline":  # one client's tight deadlines are no load
            self._refused_at = now
        self._observer.on_rejected(reason)
        raise Overloaded(
            f"server is at capacity for model {self.name} ({why}); retry after the "
            f"Retry-After delay ({Overloaded.retry_after} s) or send to another replica",
            reason=reason,
        )

    def _late(self, own: float, now: float, deadline: float, ahead: float) -> bool:
        """Whether a request whose images take ``own`` seconds, submitted now, would miss
        ``deadline`` behind ``ahead`` seconds of work. DeadlineExceeded when the deadline
        passed, or when its own inference alone is expected to outlast it (not overload:
        even an idle server could not answer in time) and a batch confirmed the estimate
        lately."""
        left = deadline - now  # > 0: _admit refused a passed deadline
        if not self._confirmed(now):
            return ahead > left  # its own images run, and re-measure (ESTIMATE_FRESH_SECONDS)
        if own >= left:
            self._observer.on_expired(1)
            raise DeadlineExceeded(
                f"the request was refused at once: its inference is expected to take "
                f"~{_milliseconds(own)}, more than the {_milliseconds(left)} left before its "
                "deadline; allow more time"
            )
        return ahead + own > left

    def _confirmed(self, now: float) -> bool:
        """Whether a batch measured the cost estimate within ESTIMATE_FRESH_SECONDS."""
        return _fresh(now, self._measured_at)

    def _note_cost(self, size: int, seconds: float, cpu_seconds: float) -> None:
        """Fold one batch's measured seconds per image (wall and CPU) into the moving
        averages."""
        now = monotonic()
        fresh = self._confirmed(now)
        self._per_image = _moving(self._per_image, seconds / size, fresh)
        self._cpu_per_image = _moving(self._cpu_per_image, cpu_seconds / size, fresh)
        self._measured_at = now
        self._observer.on_cost(self._per_image)

    def _abandon(self, items: list[_Item]) -> None:
        """Take a finished or given-up request's chunks out of the queue."""
        freed = 0
        for item in items:
            if not item.future.done():
                item.future.cancel()
            elif not item.future.cancelled():
                # Read: a failed chunk after the first is not "never retrieved".
                item.future.exception()
            if item.queued:
                # Bounded by the queue capacity, and only on the give-up path.
                self._queue.remove(item)
                item.queued = False
                freed += len(item.inputs)
        if freed:
            self._set_depth(-freed)

    def _set_depth(self, delta: int) -> None:
        self._depth += delta
        self._observer.on_queue_depth(self._depth)

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                items = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            if not items:
                self._slots.release()
                continue
            task = loop.create_task(self._run_batch(items))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
            # Not kept until the next batch: a failed batch's futures hold their errors,
            # whose tracebacks hold the requests' frames, the version that ran them among
            # them (left routing, it waited 10 s to unload: no batch came to replace it).
            del items, task

    async def _next_batch(self) -> list[_Item]:
        """Wait for the cut condition (a thread is already free), then cut."""
        while True:
            if self._queue:
                wait = self._queue[0].enqueued + self._timeout - monotonic()
                if self._depth >= self.config.max_batch_size or wait <= 0:
                    return self._cut()
            else:
                wait = None
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):  # cheaper than wait_for: no task
                    await self._arrived.wait()

    def _cut(self) -> list[_Item]:
        now = monotonic()
        batch: list[_Item] = []
        size = expired = freed = 0
        while self._queue:
            item = self._queue[0]
            n = len(item.inputs)
            live = not item.future.done()
            if live and item.deadline is not None and item.deadline <= now:
                item.future.set_exception(
                    DeadlineExceeded("the request deadline passed while it waited for a batch")
                )
                expired += 1
                live = False
            if live:
                # FIFO: stop at the first request that does not fit rather than skip it,
                # so a large request is never starved by small ones behind it.
                if size + n > self.config.max_batch_size or (batch and item.key != batch[0].key):
                    break
                batch.append(item)
                size += n
            self._queue.popleft()
            item.queued = False
            freed += n
        if expired:
            self._observer.on_expired(expired)
        if freed:
            self._set_depth(-freed)
        return batch

    async def _run_batch(self, items: list[_Item]) -> None:
        started = monotonic()
        size = sum(len(item.inputs) for item in items)
        self._in_flight += size
        # The batch's longest-waiting request that had something foreseen ahead of it.
        waited = [item for item in items if item.foreseen >= MIN_FORESEEN_SECONDS]
        if waited:
            first = waited[0]  # FIFO: the first queued waited longest
            self._waits.note(started - first.enqueued, first.foreseen, started)
        try:
            loop = asyncio.get_running_loop()
            parts = [item.inputs for item in items]
            try:
                # The batch is worth computing until its most patient request gives up,
                # or, off the loop, until all of them are gone (BatchDeadline: a remote
                # call is cancelled; a batch on the loop ends before any can go).
                deadlines = [item.deadline for item in items]
                latest = None if None in deadlines else max(d for d in deadlines if d is not None)
                where = self._placement()
                if where is Placement.LOOP:
                    output, seconds, cpu_seconds = self._infer(parts, latest)
                elif where is Placement.STEPS:
                    async with self._stepping:
                        output, seconds, cpu_seconds = await self._infer_steps(parts)
                else:
                    watched = None if latest is None else _watched(latest, items)
                    output, seconds, cpu_seconds = await loop.run_in_executor(
                        self._executor, self._infer, parts, watched
                    )
                if not isinstance(output, np.ndarray) or output.ndim == 0 or len(output) != size:
                    got = f"{type(output).__name__} {getattr(output, 'shape', '')}"
                    raise TypeError(f"predict returned {got} for a batch of {size}")
            except Exception as exc:
                if isinstance(exc, Overloaded):
                    # Shed further on (a TF Serving backend's RESOURCE_EXHAUSTED): counted
                    # as a refusal of each request in the batch, by its reason.
                    for item in items:
                        if not item.future.done():
                            self._observer.on_rejected(exc.reason)
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(_failure(exc, size))
                return
            offset = 0
            for item in items:
                n = len(item.inputs)
                item.started, item.inference_seconds = started, seconds
                if not item.future.done():
                    item.future.set_result(output[offset : offset + n])
                offset += n
            self._note_cost(size, seconds, cpu_seconds)
            self._observer.on_batch(size, output)
        finally:
            self._in_flight -= size
            self._slots.release()

    def _placement(self) -> Placement:
        """Where the next batch runs (see the module's doc)."""
        where = Placement.THREAD
        if self._fits_loop():
            if not self._refusing():
                where = Placement.LOOP
            elif self._steps is not None:
                where = Placement.STEPS
        self._ran_on_loop = where is not Placement.THREAD
        return where

    def _fits_loop(self) -> bool:
        per_image = self._cpu_per_image
        if per_image is None:
            return False
        bound = self._inline_max * (INLINE_HYSTERESIS if self._looping else 1.0)
        self._looping = per_image * self.config.max_batch_size <= bound
        return self._looping

    def _refusing(self) -> bool:
        """Whether the worker (``shedding``) or this batcher's admission refused a
        request lately: refusals are answered at once only while no batch holds the
        event loop."""
        if monotonic() - self._refused_at < SHEDDING_SECONDS:
            return True
        return self._shedding is not None and self._shedding()

    async def _infer_steps(self, parts: list[Array]) -> tuple[Array, float, float]:
        """On the event loop, a step at a time, what else is ready running between steps:
        the output, the seconds from the first step's start to the last's end, and the
        CPU seconds of the steps alone."""
        assert self._steps is not None
        steps = self._steps(parts)
        outputs: list[Array] = []
        begin, cpu = perf_counter(), 0.0
        since = 0.0
        while True:
            started = thread_time()
            output = next(steps, None)
            took = thread_time() - started
            cpu += took
            since += took
            if output is None:
                break
            outputs.append(output)
            if since >= STEP_SECONDS:
                since = 0.0
                await asyncio.sleep(0)  # refusals that arrived meanwhile are answered now
        seconds = perf_counter() - begin
        if not outputs:
            raise TypeError(f"the model's steps gave no answer for a batch of {len(parts)} parts")
        return (outputs[0] if len(outputs) == 1 else np.concatenate(outputs)), seconds, cpu

    def _infer(self, parts: list[Array], deadline: float | None) -> tuple[Array, float, float]:
        """On a batch thread or the event loop: the model on the requests' inputs; its
        output, and the seconds it took in wall and in this thread's CPU time (copying
        the inputs into the model's included)."""
        begin, cpu = perf_counter(), thread_time()
        output = self._predict(parts, deadline)
        return output, perf_counter() - begin, thread_time() - cpu


class Correction:
    """How long waits took against what admission foresaw for them: a factor for its
    next estimates (see MIN_FORESEEN_SECONDS), a moving average as the cost is."""

    def __init__(self) -> None:
        self._factor = 1.0
        self._at: float | None = None  # monotonic() of the last wait noted

    def factor(self, now: float) -> float:
        return self._factor if _fresh(now, self._at) else 1.0

    def note(self, took: float, foreseen: float, now: float) -> None:
        """One wait: one per batch (its requests waited together) or decoded list, so
        that a batch of 32 one-image requests moves it no more than one request of 32."""
        if foreseen < MIN_FORESEEN_SECONDS:
            return
        ratio = min(max(took / foreseen, 1 / MAX_WAIT_FACTOR), MAX_WAIT_FACTOR)
        # Moved as the cost is (_moving): one stall (a GC pause, a slow answer) moves it
        # up by a fifth at most; one sample per request took it from 1 to 10 in a batch.
        # A factor nothing confirmed lately is 1 again, so the sample replaces it within
        # OUTLIER_FACTOR of 1.
        if _fresh(now, self._at):
            self._factor = _moving(self._factor, ratio, fresh=True)
        else:
            self._factor = min(ratio, OUTLIER_FACTOR)
        self._at = now


class Reservation:
    """A request's images admitted before they are decoded (:meth:`DynamicBatcher.reserve`).

    Until released they count as work ahead of the requests admitted after them, as they
    will be queued first. Release it as the images are queued (nothing may await between
    the two, or a request admitted then would not see them) or when the request fails;
    as a context manager it is released on the way out whatever happens."""

    def __init__(self, batcher: DynamicBatcher) -> None:
        self._batcher = batcher
        self.images = 0

    def admit(self, n: int, deadline: float | None) -> None:
        """Raise Overloaded now if ``n`` images submitted now, behind those reserved,
        would be refused; else hold them. A request that would be shed costs no decode."""
        batcher = self._batcher
        if batcher._state != "running":
            return  # submit says why it cannot serve
        batcher.check(n, deadline)
        n = min(n, batcher._capacity)
        self.images += n
        batcher._reserved += n

    def release(self) -> None:
        self._batcher._reserved -= self.images
        self.images = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _milliseconds(seconds: float) -> str:
    """Seconds for a message, to a tenth of a ms; below that to two digits ("0.0 ms
    left" read as none left, while some was)."""
    ms = seconds * 1e3
    return f"{ms:.1f} ms" if ms >= 0.1 else f"{ms:.2g} ms"


def _fresh(now: float, measured: float | None) -> bool:
    """Whether a measure taken at ``measured`` is within ESTIMATE_FRESH_SECONDS of now."""
    return measured is not None and now - measured <= ESTIMATE_FRESH_SECONDS


def _moving(previous: float | None, sample: float, fresh: bool) -> float:
    """The moving average with one more sample, counted for at most OUTLIER_FACTOR times
    the average; a faster sample replaces an average no batch confirmed lately
    (``fresh`` False: see ESTIMATE_FRESH_SECONDS)."""
    if previous is None or (not fresh and sample < previous):
        return sample
    return previous + COST_WEIGHT * (min(sample, OUTLIER_FACTOR * previous) - previous)


def _watched(latest: float, items: list[_Item]) -> BatchDeadline:
    """The batch's deadline, abandoned once every item's future is done (answered at
    its deadline, or given up by its client) before the batch's answer came."""
    deadline = BatchDeadline(latest)
    pending = len(items)

    def one_done(_: object) -> None:
        nonlocal pending
        pending -= 1
        if pending == 0:
            deadline.abandon()

    for item in items:
        item.future.add_done_callback(one_done)
    return deadline


def _failure(exc: Exception, size: int) -> CnnserveError:
    """What each request of a failed batch gets: its own error, without the batch's
    traceback. One error shared by the batch's requests took every one's frames into its
    traceback as each awaited it, and that traceback held the runner's frame, which held
    the requests: all kept until Python's cycle collector ran."""
    if isinstance(exc, CnnserveError):
        return copy.copy(exc)
    error = InternalError(f"inference failed on a batch of {size}: {exc!r}")
    error.__cause__ = exc.with_traceback(None)
    return error


def _expire(items: list[_Item]) -> None:
    """A request's deadline passed: its chunks not yet answered fail with TimeoutError.
    The batcher skips done futures, so the images of chunks still queued are never run;
    a chunk whose batch runs is answered now, not when the batch ends."""
    for item in items:
        if not item.future.done():
            item.future.set_exception(TimeoutError())
