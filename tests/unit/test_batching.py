"""The dynamic batcher with plain-numpy predict functions: cuts, limits, deadlines, errors."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest

from service import batching
from service.batching import BatchingConfig, DynamicBatcher, Placement
from service.config import Settings
from service.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    ModelNotReady,
    Overloaded,
    TooManyImages,
)
from service.runtimes.base import BatchDeadline
from tests.helpers.core import until, whole

Array = npt.NDArray[Any]

WAIT = 5.0  # seconds any event wait may take before the test counts as hung


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run one test scenario; a hang fails the test instead of blocking the suite."""
    return asyncio.run(asyncio.wait_for(coro, WAIT))


def images(*values: int) -> Array:
    """One 2x2 RGB image per value, every pixel that value: rows are recognisable."""
    return np.broadcast_to(np.array(values, np.int64)[:, None, None, None], (len(values), 2, 2, 3))


def ids(batch: Array, deadline: float | None = None) -> Array:
    """The predict used in most tests: each image's value, so outputs say which row is which."""
    return batch[:, 0, 0, 0].copy()


def config(
    max_batch_size: int = 4,
    batch_timeout_micros: int = 0,
    max_enqueued_batches: int = 4,
    num_batch_threads: int = 1,
) -> BatchingConfig:
    return BatchingConfig(
        max_batch_size, batch_timeout_micros, max_enqueued_batches, num_batch_threads
    )


class Gate:
    """A predict that blocks on its first call until released, recording every batch."""

    def __init__(self, fn: Callable[[Array], Array] = ids) -> None:
        self.fn = fn
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[list[int]] = []
        self.deadlines: list[float | None] = []

    def __call__(self, batch: Array, deadline: float | None = None) -> Array:
        self.batches.append(batch[:, 0, 0, 0].tolist())
        self.deadlines.append(deadline)
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(WAIT)
        return self.fn(batch)

    async def blocked(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, WAIT)


class Recorder:
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.answered: list[tuple[float, float]] = []
        self.rejected = 0
        self.reasons: list[str] = []
        self.costs: list[float] = []
        self.expired = 0
        self.depths: list[int] = []
        self.stopped = False

    def on_batch(self, size: int, outputs: npt.NDArray[Any]) -> None:
        self.batches.append(size)

    def on_answered(self, queue_wait_seconds: float, inference_seconds: float) -> None:
        self.answered.append((queue_wait_seconds, inference_seconds))

    def on_rejected(self, reason: str) -> None:
        self.rejected += 1
        self.reasons.append(reason)

    def on_cost(self, seconds_per_image: float) -> None:
        self.costs.append(seconds_per_image)

    def on_expired(self, count: int) -> None:
        self.expired += count

    def on_queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def on_stopped(self) -> None:
        self.stopped = True


def spawn(
    batcher: DynamicBatcher, *values: int, deadline: float | None = None
) -> asyncio.Task[Array]:
    return asyncio.create_task(batcher.submit(images(*values), deadline=deadline))


async def gather(tasks: list[asyncio.Task[Array]]) -> list[list[int]]:
    return [r.tolist() for r in await asyncio.gather(*tasks)]


def test_config_from_settings_and_validation() -> None:
    settings = Settings(
        max_batch_size=8, batch_timeout_micros=250, max_enqueued_batches=3, num_batch_threads=2
    )
    assert BatchingConfig.from_settings(settings) == BatchingConfig(8, 250, 3, 2, 0.08, 0.02)
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchingConfig(0, 0, 1, 1)
    with pytest.raises(ValueError, match="inline_max_seconds"):
        BatchingConfig(1, 0, 1, 1, inline_max_seconds=-1.0)


def test_full_batch_is_cut_at_max_batch_size_without_waiting_for_the_timeout() -> None:
    seen: list[int] = []

    def predict(batch: Array, deadline: float | None = None) -> Array:
        seen.append(len(batch))
        return ids(batch)

    async def scenario() -> list[list[int]]:
        # A 10 s timeout: only reaching max_batch_size can cut within the run() limit.
        async with DynamicBatcher(whole(predict), config(4, 10_000_000)) as batcher:
            return await gather([spawn(batcher, v) for v in (1, 2, 3, 4)])

    assert run(scenario()) == [[1], [2], [3], [4]]
    assert seen == [4]


def test_predict_gets_each_requests_inputs_as_they_came() -> None:
    # No batch is made before predict: a runtime copies the parts into its own input
    # (Runtime.predict_parts), so the batcher passes each request's array, in order.
    seen: list[list[list[int]]] = []

    def predict(parts: list[Array], deadline: float | None = None) -> Array:
        seen.append([part[:, 0, 0, 0].tolist() for part in parts])
        return np.concatenate([ids(part) for part in parts])

    async def scenario() -> list[list[int]]:
        async with DynamicBatcher(predict, config(6, 10_000_000)) as batcher:
            return await gather([spawn(batcher, 1), spawn(batcher, 2, 3, 4), spawn(batcher, 5, 6)])

    assert run(scenario()) == [[1], [2, 3, 4], [5, 6]]
    assert seen == [[[1], [2, 3, 4], [5, 6]]]


def test_partial_batch_is_cut_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # The batcher's clock, moved: no wall-clock timing in the test.
    now = [1000.0]
    monkeypatch.setattr(batching, "monotonic", lambda: now[0])
    seen: list[int] = []

    def predict(batch: Array, deadline: float | None = None) -> Array:
        seen.append(len(batch))
        return ids(batch)

    async def scenario() -> None:
        async with DynamicBatcher(whole(predict), config(8, 60_000_000)) as batcher:
            waiting = [spawn(batcher, 1), spawn(batcher, 2, 3)]
            await until(lambda: batcher.queue_depth == 3)
            for _ in range(100):  # the loop runs on; a 60 s timeout has not passed
                await asyncio.sleep(0)
            assert seen == [] and batcher.queue_depth == 3
            now[0] += 61.0  # past the oldest request's timeout
            waiting.append(spawn(batcher, 4))  # wakes the cutter, which reads the clock
            assert await gather(waiting) == [[1], [2, 3], [4]]

    run(scenario())
    assert seen == [4]  # one partial batch (max 8), cut by the timeout


def test_zero_timeout_takes_whatever_is_queued_when_a_thread_frees() -> None:
    gate = Gate()

    async def scenario() -> None:
        async with DynamicBatcher(whole(gate), config(8, 0)) as batcher:
            first = spawn(batcher, 1)
            await gate.blocked()  # cut alone, though max_batch_size is 8
            rest = [spawn(batcher, 2), spawn(batcher, 3, 4), spawn(batcher, 5)]
            await until(lambda: batcher.queue_depth == 4)
            assert batcher.in_flight == 1
            gate.release.set()
            assert await gather([first, *rest]) == [[1], [2], [3, 4], [5]]
            assert (batcher.queue_depth, batcher.in_flight) == (0, 0)

    run(scenario())
    assert gate.batches == [[1], [2, 3, 4, 5]]


def test_each_request_gets_exactly_its_rows_and_batches_never_exceed_the_limit() -> None:
    gate = Gate(lambda b: ids(b) * 10)
    requests = [(1,), (2, 3, 4), (5, 6), (7,), (8, 9, 10), (11, 12, 13, 14), (15,)]

    async def scenario() -> list[list[int]]:
        async with DynamicBatcher(whole(gate), config(4, 0)) as batcher:
            first = spawn(batcher, 0)
            await gate.blocked()
            tasks = [spawn(batcher, *r) for r in requests]
            await until(lambda: batcher.queue_depth == 15)
            gate.release.set()
            return (await gather([first, *tasks]))[1:]

    assert run(scenario()) == [[v * 10 for v in r] for r in requests]
    # Whole requests in FIFO order, cut before the first one that does not fit.
    assert gate.batches == [[0], [1, 2, 3, 4], [5, 6, 7], [8, 9, 10], [11, 12, 13, 14], [15]]


def test_request_larger_than_max_batch_size_is_split_and_rejoined_in_order() -> None:
    gate = Gate()

    async def scenario() -> list[int]:
        async with DynamicBatcher(whole(gate), config(4, 1000)) as batcher:
            gate.release.set()
            result = await batcher.submit(images(*range(10)), deadline=None)
            return [int(v) for v in result]

    assert run(scenario()) == list(range(10))
    assert gate.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_predict_error_reaches_every_waiter_and_the_next_batch_still_works() -> None:
    failure = ValueError("boom")

    def predict(batch: Array, deadline: float | None = None) -> Array:
        if 13 in batch:
            raise failure
        if 400 in batch:
            raise InvalidRequest("bad pixels")
        return ids(batch)

    async def scenario() -> None:
        async with DynamicBatcher(whole(predict), config(4, 10_000_000)) as batcher:
            tasks = [spawn(batcher, 1), spawn(batcher, 13, 2), spawn(batcher, 3)]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, InternalError) and r.__cause__ is failure for r in results)
            # Our own errors pass through unwrapped.
            with pytest.raises(InvalidRequest, match="bad pixels"):
                await batcher.submit(images(400, 1, 2, 3), deadline=None)
            assert await gather([spawn(batcher, 5, 6), spawn(batcher, 7, 8)]) == [[5, 6], [7, 8]]

    run(scenario())


def test_wrong_output_length_is_an_internal_error_for_the_batch() -> None:
    async def scenario() -> None:
        async with DynamicBatcher(whole(lambda b, _: ids(b)[:1]), config(2, 0)) as batcher:
            with pytest.raises(InternalError, match="predict returned ndarray"):
                await batcher.submit(images(1, 2), deadline=None)

    run(scenario())


def test_full_queue_rejects_immediately_with_overloaded() -> None:
    gate = Gate()
    recorder = Recorder()

    async def scenario() -> None:
        # Capacity: 2 batches of 2 = 4 queued images.
        async with DynamicBatcher(whole(gate), config(2, 0, 2), observer=recorder) as batcher:
            first = spawn(batcher, 0)
            await gate.blocked()
            queued = [spawn(batcher, 1, 2), spawn(batcher, 3), spawn(batcher, 4)]
            await until(lambda: batcher.queue_depth == 4)
            with pytest.raises(Overloaded, match=r"at capacity.*Retry-After"):
                await batcher.submit(images(5), deadline=None)
            assert recorder.reasons == ["queue_full"]
            assert batcher.queue_depth == 4
            with pytest.raises(TooManyImages):  # could never fit, so retrying is pointless
                await batcher.submit(images(*range(5)), deadline=None)
            gate.release.set()
            assert await gather([first, *queued]) == [[0], [1, 2], [3], [4]]
            assert recorder.depths[-1] == 0

    run(scenario())
    assert max(recorder.depths) == 4


def test_deadline_expired_in_the_queue_is_dropped_before_inference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The batcher's clock, not the loop's: the deadline passes between two cuts without
    # the waiter's own timer firing, so the cut itself must drop the request.
    now = [1000.0]
    monkeypatch.setattr(batching, "monotonic", lambda: now[0])
    gate = Gate()
    recorder = Recorder()

    async def scenario() -> None:
        async with DynamicBatcher(whole(gate), config(4, 0), observer=recorder) as batcher:
            first = spawn(batcher, 0)
            await gate.blocked()
            late = spawn(batcher, 99, deadline=now[0] + 1.0)
            on_time = spawn(batcher, 1, deadline=now[0] + 10.0)
            await until(lambda: batcher.queue_depth == 2)
            now[0] += 5.0
            gate.release.set()
            with pytest.raises(DeadlineExceeded):
                await late
            assert await gather([first, on_time]) == [[0], [1]]

    run(scenario())
    assert gate.batches == [[0], [1]]
    assert recorder.expired == 1


def test_a_deadline_passing_while_its_batch_runs_is_answered_then_and_says_so() -> None:
    """Its 504 said it 'waited for a batch' though its images were being run."""
    gate = Gate()
    recorder = Recorder()

    async def scenario() -> None:
        async with DynamicBatcher(whole(gate), config(4, 0), observer=recorder) as batcher:
            running = asyncio.create_task(
                batcher.submit(images(7), deadline=time.monotonic() + 0.2)
            )
            await gate.blocked()  # its batch is in the runtime
            with pytest.raises(DeadlineExceeded, match="while its batch ran"):
                await running  # answered at its deadline: the gate is still closed
            await asyncio.sleep(0)  # the future's done callbacks run
            # Nobody waits for the batch now: a remote runtime is told to cancel its call.
            told: list[int] = []
            deadline = gate.deadlines[0]
            assert isinstance(deadline, BatchDeadline)
            deadline.on_abandoned(lambda: told.append(1))
            assert told == [1]
            gate.release.set()

    run(scenario())
    assert gate.batches == [[7]] and recorder.expired == 1


def test_a_batch_deadline_calls_back_once_abandoned() -> None:
    deadline = BatchDeadline(12.5)
    assert deadline == 12.5 and deadline + 1 == 13.5  # a float for every runtime
    told: list[str] = []
    deadline.on_abandoned(lambda: told.append("before"))
    assert told == []
    deadline.abandon()
    deadline.on_abandoned(lambda: told.append("after"))
    assert told == ["before", "after"]


def test_submit_does_not_wait_past_its_deadline() -> None:
    gate = Gate()

    async def scenario() -> None:
        async with DynamicBatcher(whole(gate), config(4, 0)) as batcher:
            first = spawn(batcher, 0)
            await gate.blocked()
            with pytest.raises(DeadlineExceeded):
                await batcher.submit(images(99), deadline=time.monotonic() + 0.05)
            assert batcher.queue_depth == 0  # the give-up freed its queue slot
            with pytest.raises(DeadlineExceeded):
                await batcher.submit(images(98), deadline=time.monotonic() - 1)
            survivor = spawn(batcher, 1)
            gate.release.set()
            assert await gather([first, survivor]) == [[0], [1]]

    run(scenario())
    assert gate.batches == [[0], [1]]


def test_a_split_request_past_its_deadline_gives_up_every_chunk_quietly() -> None:
    """A request split into chunks shares one deadline: when it passes, every chunk still
    queued is dropped (never run, its queue slots freed) and nothing is left for the
    loop to report as an exception never retrieved."""
    gate = Gate()
    unhandled: list[dict[str, Any]] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unhandled.append(ctx))
        async with DynamicBatcher(whole(gate), config(2, 0)) as batcher:
            first = spawn(batcher, 0)
            await gate.blocked()
            split = spawn(batcher, 90, 91, 92, 93, 94, deadline=time.monotonic() + 0.05)
            with pytest.raises(DeadlineExceeded):
                await split
            assert batcher.queue_depth == 0
            gate.release.set()
            assert await gather([first, spawn(batcher, 1)]) == [[0], [1]]
        del split
        gc.collect()  # a never-retrieved exception is reported when its future is freed

    run(scenario())
    assert gate.batches == [[0], [1]]
    assert unhandled == []


def test_cancelled_waiters_do_not_break_anything() -> None:
    gate = Gate()

    async def scenario() -> None:
        async with DynamicBatcher(whole(gate), config(4, 0)) as batcher:
            running = spawn(batcher, 0)
            await gate.blocked()
            queued = spawn(batcher, 99)
            kept = spawn(batcher, 1)
            await until(lambda: batcher.queue_depth == 2)
            running.cancel()  # its batch is on a thread already
            queued.cancel()
            await asyncio.gather(running, queued, return_exceptions=True)
            assert batcher.queue_depth == 1
            gate.release.set()
            assert (await kept).tolist() == [1]
            assert (await batcher.submit(images(2), deadline=None)).tolist() == [2]

    run(scenario())
    assert gate.batches == [[0], [1], [2]]


def test_stop_fails_queued_waiters_lets_running_batches_finish_and_rejects_new_work() -> None:
    gate = Gate()

    async def scenario() -> None:
        batcher = DynamicBatcher(whole(gate), config(4, 0))
        with pytest.raises(ModelNotReady):  # not started yet
            await batcher.submit(images(1), deadline=None)
        await batcher.start()
        running = spawn(batcher, 0)
        await gate.blocked()
        queued = spawn(batcher, 1)
        await until(lambda: batcher.queue_depth == 1)
        stopping = asyncio.create_task(batcher.stop())
        with pytest.raises(ModelNotReady, match="unloading"):
            await queued
        assert not stopping.done()  # still waiting for the running batch
        with pytest.raises(ModelNotReady):
            await batcher.submit(images(2), deadline=None)
        gate.release.set()
        await stopping
        assert (await running).tolist() == [0]

    run(scenario())
    assert gate.batches == [[0]]


@pytest.mark.parametrize("threads", [2, 1])
def test_batch_threads_run_batches_concurrently(threads: int) -> None:
    # Both batches must be inside predict at once to pass the barrier; with one thread
    # the barrier times out, which shows the two-thread case proves overlap.
    barrier = threading.Barrier(2, timeout=WAIT if threads == 2 else 0.2)

    def predict(batch: Array, deadline: float | None = None) -> Array:
        barrier.wait()
        return ids(batch)

    async def scenario() -> list[Any]:
        async with DynamicBatcher(whole(predict), config(1, 0, 4, threads)) as batcher:
            tasks = [spawn(batcher, 1), spawn(batcher, 2)]
            return await asyncio.gather(*tasks, return_exceptions=True)

    results = run(scenario())
    if threads == 2:
        assert [r.tolist() for r in results] == [[1], [2]]
    else:
        assert all(isinstance(r, InternalError) for r in results)


def test_observer_hears_about_each_batch() -> None:
    recorder = Recorder()

    async def scenario() -> None:
        async with DynamicBatcher(whole(ids), config(4, 10_000_000), observer=recorder) as batcher:
            await gather([spawn(batcher, 1, 2), spawn(batcher, 3, 4)])

    run(scenario())
    assert recorder.batches == [4]
    assert len(recorder.answered) == 2  # one wait and inference time per request
    assert all(wait >= 0 and seconds >= 0 for wait, seconds in recorder.answered)


def test_a_request_of_several_chunks_is_answered_once() -> None:
    """Its stages are observed once, as the request's: per chunk, a 40-image request
    at batch size 32 counted two queue waits and two inferences."""
    recorder = Recorder()

    async def scenario() -> None:
        async with DynamicBatcher(whole(ids), config(2), observer=recorder) as batcher:
            await gather([spawn(batcher, 1, 2, 3, 4, 5)])

    run(scenario())
    assert recorder.batches == [2, 2, 1]
    assert len(recorder.answered) == 1


def test_empty_request_is_invalid() -> None:
    async def scenario() -> None:
        async with DynamicBatcher(whole(ids), config()) as batcher:
            with pytest.raises(InvalidRequest):
                await batcher.submit(np.zeros((0, 2, 2, 3), np.uint8), deadline=None)

    run(scenario())


def test_a_batch_is_given_the_latest_deadline_of_its_requests() -> None:
    """A remote runtime may spend until the most patient request in the batch gives up;
    a request without a deadline lifts the limit."""

    async def scenario() -> None:
        gate = Gate()
        async with DynamicBatcher(whole(gate), config(4, 0)) as batcher:
            first = asyncio.create_task(batcher.submit(images(1), deadline=None))
            await gate.blocked()
            far = time.monotonic() + 60
            later = [
                asyncio.create_task(batcher.submit(images(2), deadline=far - 30)),
                asyncio.create_task(batcher.submit(images(3), deadline=far)),
            ]
            await until(lambda: batcher.queue_depth == 2)
            gate.release.set()
            await gather([first, *later])
        assert gate.batches == [[1], [2, 3]]
        assert gate.deadlines == [None, far]

    run(scenario())


def test_each_request_learns_its_own_queue_wait_and_inference_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """For Server-Timing: a request queued behind a running batch waited in the queue
    until that batch ended; the running one spent that time in inference."""
    shift = [0.0]  # the batcher's clock, moved on while the first batch runs
    monkeypatch.setattr(batching, "monotonic", lambda: time.monotonic() + shift[0])

    async def scenario() -> None:
        gate = Gate()
        first_timings: dict[str, float] = {}
        second_timings: dict[str, float] = {}
        async with DynamicBatcher(whole(gate), config(4, 0)) as batcher:
            first = asyncio.create_task(
                batcher.submit(images(1), deadline=None, timings=first_timings)
            )
            await gate.blocked()
            entered = time.perf_counter()
            second = asyncio.create_task(
                batcher.submit(images(2), deadline=None, timings=second_timings)
            )
            await until(lambda: batcher.queue_depth == 1)
            shift[0] = 5.0  # the queued request now waits 5 s on the batcher's clock
            released = time.perf_counter()
            gate.release.set()
            await gather([first, second])
        assert set(first_timings) == set(second_timings) == {"queue_wait", "inference"}
        assert first_timings["queue_wait"] < 5.0  # its batch started before the wait
        assert first_timings["inference"] >= released - entered
        assert second_timings["queue_wait"] >= 5.0

    run(scenario())


class Costly(Gate):
    """A Gate whose batches take ``seconds_per_image`` each on the batcher's moved clock."""

    def __init__(self, clock: list[float], seconds_per_image: float) -> None:
        super().__init__()
        self.clock = clock
        self.cost = seconds_per_image
        self.block_first = False

    def __call__(self, batch: Array, deadline: float | None = None) -> Array:
        self.batches.append(batch[:, 0, 0, 0].tolist())
        if self.block_first and not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(WAIT)
        self.clock[0] += self.cost * len(batch)
        return ids(batch)


@pytest.fixture
def costly(monkeypatch: pytest.MonkeyPatch) -> Costly:
    """Inference timed on a moved clock: 10 ms per image, so 4 images are 40 ms of work."""
    clock = [0.0]
    monkeypatch.setattr(batching, "perf_counter", lambda: clock[0])
    return Costly(clock, 0.010)


def test_admission_sheds_by_seconds_of_work_queued_not_by_count(costly: Costly) -> None:
    predict = costly
    recorder = Recorder()
    cfg = BatchingConfig(4, 0, 100, 1, queue_wait_budget_seconds=0.045)

    async def scenario() -> None:
        async with DynamicBatcher(whole(predict), cfg, observer=recorder) as batcher:
            assert batcher.seconds_per_image is None  # nothing measured: the item cap only
            first = await batcher.submit(images(1, 2, 3, 4), deadline=None)
            assert first.tolist() == [1, 2, 3, 4]
            assert batcher.seconds_per_image == pytest.approx(0.010)
            assert recorder.costs == [pytest.approx(0.010)]
            predict.block_first = True
            running = spawn(batcher, 5, 6, 7, 8)  # 40 ms in inference
            await predict.blocked()
            queued = spawn(batcher, 9)  # 40 ms ahead of it: admitted
            await until(lambda: batcher.queue_depth == 1)
            assert batcher.seconds_ahead() == pytest.approx(0.050)
            with pytest.raises(Overloaded, match="queued") as shed:
                await batcher.submit(images(10), deadline=None)  # 50 ms ahead > 45 ms budget
            assert shed.value.reason == "queue_budget"
            # Far below the item cap (400), so only the seconds of work refused it.
            assert batcher.queue_depth == 1 < cfg.queue_capacity
            predict.release.set()
            assert await gather([running, queued]) == [[5, 6, 7, 8], [9]]
            # Load gone: admitted at once, at full speed.
            assert (await batcher.submit(images(11), deadline=None)).tolist() == [11]
            assert recorder.reasons == ["queue_budget"]

    run(scenario())


def test_admission_sheds_when_the_deadline_cannot_be_met(
    costly: Costly, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(batching, "monotonic", lambda: now[0])
    predict = costly
    recorder = Recorder()
    cfg = BatchingConfig(4, 0, 100, 1, queue_wait_budget_seconds=10.0)

    async def scenario() -> None:
        async with DynamicBatcher(whole(predict), cfg, observer=recorder) as batcher:
            await batcher.submit(images(1, 2, 3, 4), deadline=None)
            predict.block_first = True
            running = spawn(batcher, 5, 6, 7, 8)  # 40 ms of work ahead of what comes next
            await predict.blocked()
            # 40 ms ahead + 10 ms of its own > 30 ms left: refused now, not timed out later.
            with pytest.raises(Overloaded) as shed:
                await batcher.submit(images(9), deadline=now[0] + 0.030)
            assert shed.value.reason == "deadline"
            assert batcher.queue_depth == 0
            patient = spawn(batcher, 10, deadline=now[0] + 1.0)
            await until(lambda: batcher.queue_depth == 1)
            predict.release.set()
            assert await gather([running, patient]) == [[5, 6, 7, 8], [10]]
            assert recorder.reasons == ["deadline"]

    run(scenario())


def test_less_than_a_batch_ahead_is_always_admitted(costly: Costly) -> None:
    # A budget of 1 ms, far below one image's 10 ms: only the one-batch floor admits.
    cfg = BatchingConfig(4, 0, 100, 1, queue_wait_budget_seconds=0.001)

    async def scenario() -> None:
        async with DynamicBatcher(whole(costly), cfg) as batcher:
            await batcher.submit(images(1), deadline=None)  # measures 10 ms per image
            costly.block_first = True
            running = spawn(batcher, 2, 3)  # 20 ms in inference, 2 images < a batch of 4
            await costly.blocked()
            queued = [spawn(batcher, 4), spawn(batcher, 5)]  # 2, then 3 images ahead: < 4
            await until(lambda: batcher.queue_depth == 2)
            with pytest.raises(Overloaded):  # now a full batch (2 + 2) is ahead
                await batcher.submit(images(6), deadline=None)
            costly.release.set()
            assert await gather([running, *queued]) == [[2, 3], [4], [5]]

    run(scenario())


def test_images_admitted_before_decoding_count_ahead_until_queued(costly: Costly) -> None:
    # 10 ms per image, 1 thread, a budget of 50 ms: what decodes now is queued first.
    recorder = Recorder()
    cfg = BatchingConfig(4, 0, 100, 1, queue_wait_budget_seconds=0.050)

    async def scenario() -> None:
        async with DynamicBatcher(whole(costly), cfg, observer=recorder) as batcher:
            await batcher.submit(images(1), deadline=None)  # measures 10 ms per image
            with batcher.reserve() as first, batcher.reserve() as second:
                first.admit(4, None)  # nothing ahead
                second.admit(2, None)  # 40 ms ahead, still decoding: within the budget
                assert batcher.reserved == 6
                assert batcher.seconds_ahead(reserved=True) == pytest.approx(0.060)
                with pytest.raises(Overloaded) as shed, batcher.reserve() as third:
                    third.admit(1, None)  # 60 ms decoding ahead of it
                assert shed.value.reason == "queue_budget" and batcher.reserved == 6
                # The reserved are behind a request that decoded already: its submit
                # counts only what is queued or running.
                assert await batcher.submit(images(7), deadline=None) == [7]
                first.release()  # queued (or failed): no longer ahead as decoding work
                assert batcher.reserved == 2
                with batcher.reserve() as fourth:
                    fourth.admit(1, None)
            assert batcher.reserved == 0  # released on the way out, whatever happened
            assert recorder.reasons == ["queue_budget"]

    run(scenario())


def test_a_passed_deadline_is_refused_before_decoding_on_a_new_batcher_too() -> None:
    """Before any batch measured the work, a reservation's check skipped the deadline:
    a new worker's first request whose deadline had passed was decoded, then refused
    "while decoding images"."""
    recorder = Recorder()

    async def scenario() -> None:
        async with DynamicBatcher(whole(ids), config(), observer=recorder) as batcher:
            assert batcher.seconds_per_image is None  # nothing measured yet
            with pytest.raises(DeadlineExceeded, match="passed before it was queued"):
                batcher.reserve().admit(1, time.monotonic() - 0.001)
            assert recorder.expired == 1 and batcher.reserved == 0

    run(scenario())


def test_a_reservation_counts_against_the_queue_cap() -> None:
    async def scenario() -> None:
        async with DynamicBatcher(whole(ids), config(max_enqueued_batches=2)) as batcher:
            with batcher.reserve() as held:
                held.admit(8, None)  # the queue's 2 x 4 images, decoding
                with pytest.raises(Overloaded) as shed:
                    batcher.reserve().admit(1, None)
                assert shed.value.reason == "queue_full"
            assert batcher.reserved == 0

    run(scenario())


def test_waits_longer_than_foreseen_correct_the_estimate_until_they_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(batching, "monotonic", lambda: now[0])
    waits = batching.Correction()
    assert waits.factor(now[0]) == 1.0
    waits.note(0.002, 0.001, now[0])  # under MIN_FORESEEN_SECONDS: too small to tell
    assert waits.factor(now[0]) == 1.0
    waits.note(0.160, 0.080, now[0])  # twice as long as foreseen
    assert waits.factor(now[0]) == 2.0
    waits.note(0.080, 0.080, now[0])  # then as foreseen: moves by COST_WEIGHT
    assert waits.factor(now[0]) == pytest.approx(2.0 + batching.COST_WEIGHT * (1.0 - 2.0))
    before = waits.factor(now[0])
    waits.note(100.0, 0.080, now[0])  # one stall moves it up by a fifth at most
    assert waits.factor(now[0]) == pytest.approx(before * 1.2)
    now[0] += batching.ESTIMATE_FRESH_SECONDS + 0.1  # no wait confirmed it since
    assert waits.factor(now[0]) == 1.0


def test_admission_counts_the_waits_requests_had_against_the_estimate(costly: Costly) -> None:
    # 10 ms per image on one thread, budget 50 ms: 4 images ahead (40 ms) are admitted
    # until requests are seen waiting twice what was foreseen for them.
    cfg = BatchingConfig(4, 0, 100, 1, queue_wait_budget_seconds=0.050)

    async def scenario() -> None:
        async with DynamicBatcher(whole(costly), cfg) as batcher:
            await batcher.submit(images(1), deadline=None)  # measures 10 ms per image
            with batcher.reserve() as held:
                held.admit(4, None)
                batcher.check(1, None)  # 40 ms foreseen ahead: admitted
                now = batching.monotonic()
                batcher._waits.note(0.100, 0.050, now)  # a request waited 100 ms for 50
                with pytest.raises(Overloaded) as shed:
                    batcher.check(1, None)  # 40 ms foreseen is 80 ms, corrected
                assert shed.value.reason == "queue_budget"

    run(scenario())


def test_batches_on_the_event_loop_are_foreseen_one_at_a_time() -> None:
    # Two batch threads, but a version whose batches run on the event loop runs them one
    # after another: the images ahead take twice what two threads would.
    async def scenario() -> None:
        predict = Threads()
        cfg = BatchingConfig(4, 0, 4, 2, inline_max_seconds=10.0)
        async with DynamicBatcher(whole(predict), cfg, inline=True) as batcher:
            await batcher.submit(images(1, 1), deadline=None)  # measured, on a thread
            with batcher.reserve() as held:
                held.admit(4, None)
                on_thread = batcher.seconds_ahead(reserved=True)
            await batcher.submit(images(2, 2), deadline=None)  # on the loop now
            with batcher.reserve() as held:
                held.admit(4, None)
                on_loop = batcher.seconds_ahead(reserved=True)
            per_image = batcher.seconds_per_image
            assert per_image is not None
            assert on_thread == pytest.approx(4 * per_image / 2, rel=0.5)
            assert on_loop == pytest.approx(4 * per_image, rel=0.01)

    run(scenario())


def test_batches_leave_the_event_loop_while_its_own_admission_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refusals by the batcher's admission (queue_budget, deadline) keep its batches off
    the loop as the worker's do: a 503 must not wait for a batch on the loop."""
    now = [50.0]
    monkeypatch.setattr(batching, "monotonic", lambda: now[0])

    async def scenario() -> list[tuple[int, int]]:
        predict = Threads()
        cfg = BatchingConfig(4, 0, 1, 1, inline_max_seconds=10.0)
        async with DynamicBatcher(whole(predict), cfg, inline=True) as batcher:
            await batcher.submit(images(0), deadline=None)  # measured: on a thread
            await batcher.submit(images(1), deadline=None)  # on the loop
            with pytest.raises(Overloaded), batcher.reserve() as held:
                held.admit(4, None)  # the queue's whole 4 images
                held.admit(1, None)  # queue_full
            await batcher.submit(images(2), deadline=None)  # refused lately: a thread
            now[0] += batching.SHEDDING_SECONDS + 0.1
            await batcher.submit(images(3), deadline=None)  # back on the loop
        return predict.calls

    loop_thread = threading.get_ident()
    on_loop = [thread == loop_thread for thread, _ in run(scenario())]
    assert on_loop == [False, True, False, True]


class Threads:
    """A predict that notes which thread ran each batch and how big it was."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, batch: Array, deadline: float | None = None) -> Array:
        self.calls.append((threading.get_ident(), len(batch)))
        # A model that costs at least 1 ms of this thread's CPU per image.
        until = time.thread_time() + 0.001 * len(batch)
        while time.thread_time() < until:
            pass
        return ids(batch)


@pytest.mark.parametrize(
    ("inline", "inline_max_seconds", "on_loop"),
    # 0.003: each batch (2 images) would fit, a full one (4) does not.
    [(True, 10.0, True), (False, 10.0, False), (True, 0.0, False), (True, 0.003, False)],
)
def test_short_batches_run_on_the_event_loop_only_when_allowed(
    inline: bool, inline_max_seconds: float, on_loop: bool
) -> None:
    """The first batch (nothing measured yet) always goes to a batch thread; later ones
    run on the loop's own thread only for a runtime that computes on the caller and
    while a full batch is estimated within the bound."""

    async def scenario() -> list[tuple[int, int]]:
        predict = Threads()
        cfg = BatchingConfig(4, 0, 4, 1, inline_max_seconds=inline_max_seconds)
        async with DynamicBatcher(whole(predict), cfg, inline=inline) as batcher:
            for value in range(3):
                assert (await batcher.submit(images(value, value), deadline=None)).tolist() == [
                    value,
                    value,
                ]
        return predict.calls

    loop_thread = threading.get_ident()  # asyncio.run runs the loop on this thread
    calls = run(scenario())
    assert [size for _, size in calls] == [2, 2, 2]
    assert calls[0][0] != loop_thread
    assert all((thread == loop_thread) is on_loop for thread, _ in calls[1:])


def test_batches_leave_the_event_loop_while_the_worker_sheds() -> None:
    """While the worker refuses requests for load, batches go to the batch thread (a
    refusal must not wait for a batch on the loop), and come back once it stops."""

    async def scenario() -> list[tuple[int, int]]:
        predict = Threads()
        shedding = [False]
        cfg = BatchingConfig(4, 0, 4, 1, inline_max_seconds=10.0)
        async with DynamicBatcher(
            whole(predict), cfg, inline=True, shedding=lambda: shedding[0]
        ) as batcher:
            for value, shed in ((0, False), (1, False), (2, True), (3, True), (4, False)):
                shedding[0] = shed
                await batcher.submit(images(value, value), deadline=None)
        return predict.calls

    loop_thread = threading.get_ident()
    calls = run(scenario())
    on_loop = [thread == loop_thread for thread, _ in calls]
    assert on_loop == [False, True, False, False, True]  # the first: nothing measured


def test_while_the_worker_sheds_batches_with_steps_run_on_the_loop_a_step_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A runtime that computes a batch in steps (LiteRT's chunks) keeps its batches on
    the event loop while the worker sheds, yielding between steps: what else is ready
    (a refusal to answer) runs between them, not after the batch. One such batch at a
    time; the answers are the whole batch's, in order; the cost is noted from the
    steps' CPU time."""
    monkeypatch.setattr(batching, "STEP_SECONDS", 0.0005)  # a turn after each 1 ms step
    log: list[str] = []

    def steps(parts: list[Array]) -> Iterator[Array]:
        rows = np.concatenate(parts)
        for start in range(0, len(rows), 2):
            log.append(f"step {threading.get_ident() == loop_thread} {rows[start, 0, 0, 0]}")
            until = time.thread_time() + 0.001  # 1 ms of CPU a step
            while time.thread_time() < until:
                pass
            yield ids(rows[start : start + 2])

    async def scenario() -> list[list[int]]:
        shedding = [False]
        cfg = BatchingConfig(4, 0, 4, 2, inline_max_seconds=10.0)
        predict = Threads()
        async with DynamicBatcher(
            whole(predict), cfg, steps=steps, inline=True, shedding=lambda: shedding[0]
        ) as batcher:
            await batcher.submit(images(9), deadline=None)  # measured: on the loop from now
            shedding[0] = True

            async def other_work() -> None:
                for _ in range(3):
                    log.append("other")
                    await asyncio.sleep(0)

            first = batcher.submit(images(1, 2, 3, 4), deadline=None)
            second = batcher.submit(images(6, 7, 8), deadline=None)
            answers = await asyncio.gather(first, second, other_work())
            assert batcher._placement() is Placement.STEPS
            assert batcher.seconds_per_image is not None
        return [answer.tolist() for answer in answers[:2]]

    loop_thread = threading.get_ident()
    assert run(scenario()) == [[1, 2, 3, 4], [6, 7, 8]]
    steps_seen = [entry for entry in log if entry.startswith("step")]
    # Two batches (4 + 3 images), each in two steps, all on the loop, one after the other.
    assert steps_seen == ["step True 1", "step True 3", "step True 6", "step True 8"]
    first_step = log.index(steps_seen[0])
    assert "other" in log[first_step + 1 : log.index(steps_seen[-1])]  # ran between steps


def test_a_batch_in_steps_gives_the_loop_its_turn_only_once_its_steps_took_the_step_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each turn costs the loop: steps shorter than STEP_SECONDS run on together."""
    monkeypatch.setattr(batching, "STEP_SECONDS", 10.0)
    log: list[str] = []

    def steps(parts: list[Array]) -> Iterator[Array]:
        rows = np.concatenate(parts)
        for start in range(0, len(rows), 2):
            log.append("step")
            yield ids(rows[start : start + 2])

    async def scenario() -> list[int]:
        cfg = BatchingConfig(8, 0, 4, 1, inline_max_seconds=10.0)
        async with DynamicBatcher(
            whole(Threads()), cfg, steps=steps, inline=True, shedding=lambda: True
        ) as batcher:
            batcher._note_cost(1, 0.001, 0.001)  # measured: fits the loop

            async def other_work() -> None:
                for _ in range(4):
                    log.append("other")
                    await asyncio.sleep(0)

            answer, _ = await asyncio.gather(
                batcher.submit(images(*range(8)), deadline=None), other_work()
            )
        return cast(list[int], answer.tolist())

    assert run(scenario()) == list(range(8))
    first = log.index("step")
    assert log[first : first + 4] == ["step"] * 4  # no turn given between them


def test_batches_leave_the_event_loop_only_well_past_the_bound() -> None:
    """An estimate near the bound does not send a version's batches back and forth:
    once on the loop they return to a thread only past INLINE_HYSTERESIS times it, and
    come back when the estimate is within the bound again."""

    async def scenario() -> list[bool]:
        # A full batch is 4 images; the bound 5 ms, so 1.25 ms per image is the edge.
        cfg = BatchingConfig(4, 0, 4, 1, inline_max_seconds=0.005)
        seen = []
        async with DynamicBatcher(whole(ids), cfg, inline=True) as batcher:

            def settle(per_image: float) -> None:
                for _ in range(60):  # the moving average converges
                    batcher._note_cost(4, 4 * per_image, 4 * per_image)
                seen.append(batcher._placement() is Placement.LOOP)

            settle(0.001)  # 4 ms: on the loop
            settle(0.0015)  # 6 ms: past the bound, within 1.5 of it: stays
            settle(0.0025)  # 10 ms: past 7.5 ms: a thread
            settle(0.0015)  # 6 ms: not within the bound: stays on the thread
            settle(0.001)  # back on the loop
        return seen

    assert run(scenario()) == [True, True, False, False, True]


def test_where_batches_run_follows_cpu_time_not_time_lost_to_preemption() -> None:
    """A batch whose thread the OS preempted took longer in wall time only: that must
    not send a version's batches off the loop (the admission estimate, in wall time,
    still sees it)."""

    async def scenario() -> tuple[bool, bool, float]:
        cfg = BatchingConfig(4, 0, 4, 1, inline_max_seconds=0.005)
        async with DynamicBatcher(whole(ids), cfg, inline=True) as batcher:
            for _ in range(60):
                batcher._note_cost(4, 0.004, 0.004)  # 1 ms per image: on the loop
            settled = batcher._placement() is Placement.LOOP
            for _ in range(60):  # 4 ms of CPU each, but 40 ms on the clock
                batcher._note_cost(4, 0.040, 0.004)
            per_image = batcher.seconds_per_image
            assert per_image is not None
            return settled, batcher._placement() is Placement.LOOP, per_image

    settled, preempted, wall = run(scenario())
    assert settled and preempted
    assert wall == pytest.approx(0.010, rel=1e-3)


def test_a_batch_on_the_event_loop_answers_errors_and_deadlines_as_on_a_thread() -> None:
    """Errors raised by predict on the loop reach the waiters as InternalError, and the
    next batch still runs."""
    failing = {"now": False}

    def predict(batch: Array, deadline: float | None = None) -> Array:
        if failing["now"]:
            raise RuntimeError("boom")
        return ids(batch)

    async def scenario() -> None:
        cfg = BatchingConfig(4, 0, 4, 1, inline_max_seconds=10.0)
        async with DynamicBatcher(whole(predict), cfg, inline=True) as batcher:
            assert (await batcher.submit(images(1), deadline=None)).tolist() == [1]
            failing["now"] = True
            with pytest.raises(InternalError, match="boom"):
                await batcher.submit(images(2), deadline=None)
            failing["now"] = False
            assert (await batcher.submit(images(3), deadline=None)).tolist() == [3]

    run(scenario())


def test_one_slow_batch_moves_the_estimate_by_a_bounded_step(costly: Costly) -> None:
    """A backend's hiccup (one answer 0.6 s late where batches take 10 ms per image)
    moves the estimate up by a fifth at most, not most of the way to the outlier."""

    async def scenario() -> list[float]:
        async with DynamicBatcher(whole(costly), config()) as batcher:
            await batcher.submit(images(1), deadline=None)
            costly.cost = 0.600
            await batcher.submit(images(2), deadline=None)
            slow = batcher.seconds_per_image
            costly.cost = 0.010
            await batcher.submit(images(3), deadline=None)
            assert slow is not None and batcher.seconds_per_image is not None
            return [slow, batcher.seconds_per_image]

    slow, after = run(scenario())
    assert slow == pytest.approx(0.012)  # 10 ms + a fifth of it; 128 ms unbounded
    assert after < slow


def test_an_estimate_no_batch_confirmed_lately_refuses_no_short_deadline(
    costly: Costly, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests whose own inference the estimate says outlasts their deadline get a 504 at
    once while batches confirm it; once none has for ESTIMATE_FRESH_SECONDS, one runs,
    and its faster measure ends the refusals at once (they went on for good: nothing
    ran to correct the estimate)."""
    now = [1000.0]
    monkeypatch.setattr(batching, "monotonic", lambda: now[0])
    recorder = Recorder()

    async def scenario() -> None:
        async with DynamicBatcher(whole(costly), config(), observer=recorder) as batcher:
            costly.cost = 0.300  # a slow moment: 300 ms per image, measured
            await batcher.submit(images(1), deadline=None)
            costly.cost = 0.010  # over; but nothing with a short deadline runs to see it
            with pytest.raises(DeadlineExceeded):
                await batcher.submit(images(2), deadline=now[0] + 0.100)
            assert recorder.expired == 1 and costly.batches == [[1]]
            now[0] += 5.0  # no batch since (a review found them refused 5 s later)
            answer = await batcher.submit(images(3), deadline=now[0] + 0.100)
            assert answer.tolist() == [3]  # ran, and measured 10 ms
            assert batcher.seconds_per_image == pytest.approx(0.010)
            for value in (4, 5, 6):  # full speed from here on
                assert (await batcher.submit(images(value), deadline=now[0] + 0.1)).tolist() == [
                    value
                ]
            assert recorder.expired == 1 and recorder.rejected == 0

    run(scenario())


def own_inference_refusal(
    costly: Costly, monkeypatch: pytest.MonkeyPatch, count: int, left: float
) -> str:
    """The message refusing ``count`` images with ``left`` seconds before their deadline,
    once a batch measured 10 ms per image (a clock that stands still)."""
    now = [1000.0]
    monkeypatch.setattr(batching, "monotonic", lambda: now[0])

    async def scenario() -> str:
        async with DynamicBatcher(whole(costly), config()) as batcher:
            await batcher.submit(images(1, 2), deadline=None)  # 10 ms per image
            with pytest.raises(DeadlineExceeded) as refused:
                await batcher.submit(images(*range(3, 3 + count)), deadline=now[0] + left)
            return refused.value.message

    return run(scenario())


def test_a_deadline_refused_for_its_own_inference_is_not_said_to_have_passed(
    costly: Costly, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = own_inference_refusal(costly, monkeypatch, 3, 0.025)
    assert "expected to take ~30.0 ms, more than the 25.0 ms left before its deadline" in message
    assert "passed" not in message  # it had not: 25 ms were left


def test_a_backend_shed_is_counted_for_each_request_of_the_batch() -> None:
    """A batch the runtime refused for load (TF Serving's RESOURCE_EXHAUSTED, reason
    backend) fails its requests with that 503 and is counted as their refusal."""
    gate = Gate()
    recorder = Recorder()
    shedding = [False]

    def predict(batch: Array, deadline: float | None = None) -> Array:
        if shedding[0]:
            raise Overloaded("the model backend (TF Serving) is overloaded", reason="backend")
        return gate(batch, deadline)

    async def scenario() -> None:
        async with DynamicBatcher(whole(predict), config(), observer=recorder) as batcher:
            first = spawn(batcher, 1)
            await gate.blocked()
            queued = [spawn(batcher, 2), spawn(batcher, 3, 4)]  # one batch of two requests
            await until(lambda: batcher.queue_depth == 3)
            shedding[0] = True  # from the next batch on
            gate.release.set()
            assert (await first).tolist() == [1]
            for task in queued:
                with pytest.raises(Overloaded) as shed:
                    await task
                assert shed.value.reason == "backend"
            assert recorder.reasons == ["backend", "backend"]

    run(scenario())


class Held:
    """Stands for what a request's caller holds (the version it resolved, its arrays)."""


def test_a_failed_request_lets_go_of_what_it_held_without_the_cycle_collector() -> None:
    """An error set on a request's future, awaited, took the frames it passed through
    into its traceback while one of them held the future: a cycle, so the caller's
    frame (the version that answered: it waited 10 s to unload after leaving routing;
    the request's arrays) was kept until Python's cycle collector ran."""
    held: list[weakref.ref[Held]] = []

    def failing(batch: Array, deadline: float | None) -> Array:
        raise ModelNotReady("the model backend refused it")

    async def caller(batcher: DynamicBatcher) -> None:
        mine = Held()  # a local of the caller's frame, as the resolved version is
        held.append(weakref.ref(mine))
        await batcher.submit(np.zeros((2, 3), np.float32), deadline=None)

    async def scenario() -> list[Held | None]:
        async with DynamicBatcher(whole(failing), config()) as batcher:
            for _ in range(3):
                # Not kept: pytest.raises would keep the error, and its frames.
                with contextlib.suppress(ModelNotReady):
                    await caller(batcher)
            # Freed while the batcher runs on, no batch coming (a few loop turns).
            with contextlib.suppress(AssertionError):  # "never held": said below
                await until(lambda: all(ref() is None for ref in held))
            return [ref() for ref in held]

    gc.collect()
    gc.disable()
    try:
        assert run(scenario()) == [None] * 3
    finally:
        gc.enable()


def test_a_deadline_under_a_tenth_of_a_millisecond_is_not_printed_as_none_left(
    costly: Costly, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = own_inference_refusal(costly, monkeypatch, 1, 0.00005)
    assert "more than the 0.05 ms left" in message
