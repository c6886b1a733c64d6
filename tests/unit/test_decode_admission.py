"""The data plane's decode-pool admission: seconds of decoding queued, not items: each
image counted by its work (pixels from its header), at measured seconds per pixel."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service import dataplane
from service.config import Settings
from service.dataplane import DataPlane
from service.errors import DeadlineExceeded, ModelNotFound, Overloaded
from service.preprocessing import Opened, PreprocessSpec
from tests.helpers.core import until
from tests.helpers.images import encode, gradient


def test_decode_queue_sheds_by_seconds_of_decoding_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every image "takes" 20 ms to decode (as measured on the decode thread).
    def fake_decode(opened: object, spec: PreprocessSpec, abandoned: Any) -> tuple[Any, float]:
        return np.zeros((224, 224, 3), np.uint8), 0.020

    monkeypatch.setattr(dataplane, "_timed_decode", fake_decode)
    pool = ThreadPoolExecutor(1)
    # Images are opened (header only) before the pool: they are real ones here, and never
    # small enough to be decoded inline.
    settings = Settings(queue_wait_budget_seconds=0.05, inline_decode_max_pixels=0)
    plane = DataPlane(settings, None, pool)  # type: ignore[arg-type]
    png = encode(gradient(), "PNG")
    admitted: list[int] = []
    target = SimpleNamespace(model="m", spec=PreprocessSpec())
    held = SimpleNamespace(admit=lambda n, d: None)  # the batcher admits all
    gate = threading.Event()

    async def scenario() -> None:
        deadline = time.monotonic() + 30
        await plane.decode([png], target, deadline, held)  # type: ignore[arg-type]  # measures 20 ms
        blocker = asyncio.get_running_loop().run_in_executor(pool, gate.wait, 5)
        first = asyncio.create_task(plane.decode([png, png], target, deadline, held))  # type: ignore[arg-type]
        await until(lambda: plane._decoding == 2)
        second = asyncio.create_task(plane.decode([png, png], target, deadline, held))  # type: ignore[arg-type]
        await until(lambda: plane._decoding == 4)  # 40 ms were ahead of it: admitted
        with pytest.raises(Overloaded, match="decoded") as shed:
            await plane.decode([png], target, deadline, held)  # type: ignore[arg-type]  # 80 ms ahead
        assert shed.value.reason == "decode_queue"
        gate.set()
        await blocker
        for task in (first, second):
            admitted.append(len(await task))
        assert plane._decoding == 0
        assert len(await plane.decode([png], target, deadline, held)) == 1  # load gone: admitted  # type: ignore[arg-type]

    try:
        asyncio.run(asyncio.wait_for(scenario(), 10))
    finally:
        gate.set()
        pool.shutdown()
    assert admitted == [2, 2]


def test_a_decode_its_request_gave_up_on_still_counts_until_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request whose deadline passed while its image decoded is answered 504, but the
    decode runs on to its end: it stays counted until then. Counted only until the 504,
    a client sending huge images with a 50 ms deadline kept both decode threads busy
    while admission saw them idle, and refused nothing (an outside audit)."""
    gate = threading.Event()

    def slow_decode(opened: object, spec: PreprocessSpec, abandoned: Any) -> tuple[Any, float]:
        gate.wait(5)
        return np.zeros((224, 224, 3), np.uint8), 0.020

    monkeypatch.setattr(dataplane, "_timed_decode", slow_decode)
    pool = ThreadPoolExecutor(2)
    settings = Settings(queue_wait_budget_seconds=0.05, inline_decode_max_pixels=0)
    plane = DataPlane(settings, None, pool)  # type: ignore[arg-type]
    plane._decode_per_pixel = 0.1  # measured slow: any image queued is over the budget
    png = encode(gradient(), "PNG")
    target = SimpleNamespace(model="m", spec=PreprocessSpec())
    held = SimpleNamespace(admit=lambda n, d: None)

    async def scenario() -> None:
        for _ in range(2):  # both threads taken by decodes whose requests give up
            with pytest.raises(DeadlineExceeded):
                await plane.decode([png], target, time.monotonic() + 0.05, held)  # type: ignore[arg-type]
        assert plane._decoding == 2
        with pytest.raises(Overloaded):
            await plane.decode([png], target, time.monotonic() + 30, held)  # type: ignore[arg-type]
        gate.set()
        await until(lambda: plane._decoding == 0)
        assert len(await plane.decode([png], target, time.monotonic() + 30, held)) == 1  # type: ignore[arg-type]

    try:
        asyncio.run(asyncio.wait_for(scenario(), 10))
    finally:
        gate.set()
        pool.shutdown()


@pytest.mark.parametrize(("pixels", "most_at_once"), [(4_000, 1), (100, 2)])
def test_big_images_take_turns_on_the_decode_threads(
    monkeypatch: pytest.MonkeyPatch, pixels: int, most_at_once: int
) -> None:
    """A lossless WebP of 40M pixels peaks at ~550 MB as it decodes: one on each decode
    thread of each worker went past the pod's memory (an outside audit). Images over
    BIG_DECODE_PIXELS decode one at a time; smaller ones side by side."""
    monkeypatch.setattr(dataplane, "BIG_DECODE_PIXELS", 1_000)
    running, most = 0, 0
    lock = threading.Lock()
    both = threading.Barrier(2, timeout=0.5)  # met only when two decode at once

    def decode(opened: object, spec: PreprocessSpec) -> Any:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            with contextlib.suppress(threading.BrokenBarrierError):
                both.wait()
        finally:
            with lock:
                running -= 1
        return np.zeros((224, 224, 3), np.uint8)

    monkeypatch.setattr(dataplane, "preprocess_opened", decode)
    side = int(pixels**0.5)
    images = [SimpleNamespace(size=(side, side)) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        for job in [pool.submit(dataplane._timed_decode, i, PreprocessSpec()) for i in images]:
            job.result(timeout=10)
    assert most == most_at_once


def test_a_big_image_is_not_decoded_once_its_request_stopped_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job waiting for its turn at the big-image lock is running as far as its pool
    knows: cancelling it did nothing, and it decoded in full (~550 MB) for a request
    answered 504 long before (a review)."""
    monkeypatch.setattr(dataplane, "BIG_DECODE_PIXELS", 1_000)
    gate, decoded = threading.Event(), []

    def decode(opened: Any, spec: PreprocessSpec) -> Any:
        decoded.append(opened.name)
        gate.wait(5)
        return np.zeros((224, 224, 3), np.uint8)

    monkeypatch.setattr(dataplane, "preprocess_opened", decode)
    first, second = (SimpleNamespace(size=(100, 100), name=n) for n in ("first", "second"))
    gave_up = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(dataplane._timed_decode, first, PreprocessSpec())
        waiting = pool.submit(dataplane._timed_decode, second, PreprocessSpec(), gave_up)
        gave_up.set()  # its request was answered meanwhile
        with pytest.raises(dataplane._Abandoned):
            waiting.result(timeout=10)  # at once: not after the first's decode
        assert not running.done()
        gate.set()
        running.result(timeout=10)
    assert decoded == ["first"]


def test_big_images_are_admitted_by_the_wait_for_their_turn() -> None:
    """Big images decode one at a time: divided by the threads, what waited ahead of one
    looked half as long, and such requests were admitted to time out in the queue."""
    plane = idle_plane(Settings(queue_wait_budget_seconds=0.05))
    plane._decode_per_pixel = 1e-8  # 10 ns a pixel of decode work
    plane._decode_threads = 2
    plane._decoding, plane._decoding_work = 1, 8_000_000  # one thread busy: 40 ms a thread
    plane._decoding_big = 8_000_000  # ...but 80 ms ahead of a big one
    plane._admit_decode("m")  # a small image: a thread is free
    with pytest.raises(Overloaded, match="large images, one at a time, wait"):
        plane._admit_big("m", 20_000_000)
    plane._decoding_big = 4_000_000  # 40 ms: within the budget
    plane._admit_big("m", 20_000_000)


def idle_plane(settings: Settings) -> DataPlane:
    """A data plane for checks that decode nothing (its pool is shut down at once)."""
    with ThreadPoolExecutor(1) as pool:
        return DataPlane(settings, None, pool)  # type: ignore[arg-type]


class Refusing:
    """A reservation whose batcher has no room."""

    def admit(self, n: int, deadline: float | None) -> None:
        raise Overloaded("no room", reason="queue_budget")


def test_a_list_is_refused_before_its_images_headers_are_read() -> None:
    # Reading 32 headers cost a loaded event loop more than the refusal: not bytes
    # that are no image at all are read once the request is refused.
    plane = idle_plane(Settings())
    target = SimpleNamespace(model="m", spec=PreprocessSpec())
    with pytest.raises(Overloaded):
        asyncio.run(plane.decode([b"no image", b"none"], target, time.monotonic() + 30, Refusing()))  # type: ignore[arg-type]


def test_decoding_slower_than_its_estimate_sheds_sooner(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1 µs of CPU per pixel of work on 1 thread; 4 images of 10,000 decoding are 40 ms
    # ahead: admitted with a 50 ms budget, until decoding is seen taking twice what was
    # foreseen.
    plane = idle_plane(Settings(queue_wait_budget_seconds=0.05))
    plane._decode_per_pixel, plane._decoding, plane._decoding_work = 1e-6, 4, 40_000
    plane._admit_decode("m")
    now = time.monotonic()
    plane._decode_waits.note(0.100, 0.050, now)
    with pytest.raises(Overloaded, match="decoded") as shed:
        plane._admit_decode("m")
    assert shed.value.reason == "decode_queue"


def test_room_is_checked_on_the_version_that_would_answer() -> None:
    plane = idle_plane(Settings())
    checked: list[int] = []

    class Full:
        def check(self, n: int, deadline: float | None) -> None:
            checked.append(n)
            raise Overloaded("no room", reason="queue_budget")

    target = SimpleNamespace(model="m", batcher=Full())
    plane.route = lambda *args: target  # type: ignore[method-assign,assignment]
    with pytest.raises(Overloaded):
        plane.check_room(None, None, None, time.monotonic() + 30)
    assert checked == [1]

    def unknown(*args: object) -> None:
        raise ModelNotFound("no model 'x'")

    plane.route = unknown  # type: ignore[method-assign,assignment]
    plane.check_room("x", None, None, time.monotonic() + 30)  # its own routing says so


# A 64x48 image and a 4000x4000 one (16 million pixels in a 16 KB file): each decoded on
# the decode threads (nothing is decoded inline here), where each "takes" what decoding
# took as measured, 20 ns a pixel and 0.1 ms an image (0.16 ms and 0.32 s).
SMALL = encode(gradient(), "PNG")
HUGE = encode(Image.new("L", (4000, 4000)), "PNG")
TARGET = SimpleNamespace(model="m", spec=PreprocessSpec())
HELD = SimpleNamespace(admit=lambda n, d: None)  # the batcher admits all


class Clock:
    """The data plane's time.monotonic(), moved on by each decode's recorded seconds: the
    fake decodes take none, and their waits would look far shorter than foreseen."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def measured(
        self, opened: Opened, spec: PreprocessSpec, abandoned: Any = None
    ) -> tuple[Any, float]:
        width, height = opened.size
        seconds = 20e-9 * width * height + 1e-4
        self.now += seconds  # only the one decode thread moves it
        return np.zeros((spec.height, spec.width, 3), np.uint8), seconds


class Worker:
    """A data plane of one decode thread (the default 80 ms budget) whose thread can be
    held busy, so that images submitted meanwhile wait in its queue."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.clock = Clock()
        monkeypatch.setattr(dataplane, "_timed_decode", self.clock.measured)
        monkeypatch.setattr(dataplane, "time", self.clock)
        self.pool = ThreadPoolExecutor(1)
        self.plane = DataPlane(Settings(inline_decode_max_pixels=0), None, self.pool)  # type: ignore[arg-type]
        self.gate = threading.Event()

    async def decode(self, *images: bytes) -> Any:
        deadline = self.clock.now + 30
        return await self.plane.decode(list(images), TARGET, deadline, HELD)  # type: ignore[arg-type]

    @asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """The decode thread busy until the block ends (then freed, and waited for)."""
        blocker = asyncio.get_running_loop().run_in_executor(self.pool, self.gate.wait, 5)
        try:
            yield
        finally:
            self.gate.set()
            await blocker

    async def queued(self, *images: bytes) -> asyncio.Task[Any]:
        """A request of ``images`` submitted and admitted: its images wait in the queue."""
        before = self.plane._decoding
        task = asyncio.create_task(self.decode(*images))
        await until(lambda: self.plane._decoding == before + len(images))
        return task

    async def refused(self, *images: bytes) -> None:
        with pytest.raises(Overloaded, match="decoded") as shed:
            await self.decode(*images)
        assert shed.value.reason == "decode_queue"

    def run(self, scenario: Any) -> None:
        try:
            asyncio.run(asyncio.wait_for(scenario, 10))
        finally:
            self.gate.set()
            self.pool.shutdown()


@pytest.mark.parametrize("history", [[SMALL] * 20, [HUGE] * 2], ids=["small", "huge"])
def test_huge_images_are_counted_by_their_pixels_whatever_came_before(
    monkeypatch: pytest.MonkeyPatch, history: list[bytes]
) -> None:
    # The audit's case: 40 ordinary images set a moving average of seconds per image
    # that a 0.32 s image then counted as; all of a burst of huge ones were admitted.
    # Counted by pixels, the second huge image waits for the first (0.32 s): refused,
    # after small images as after huge ones; so is a small one behind it.
    worker = Worker(monkeypatch)

    async def scenario() -> None:
        for image in history:
            await worker.decode(image)
        async with worker.held():
            first = await worker.queued(HUGE)  # no image waits: admitted, however large
            await worker.refused(HUGE)
            await worker.refused(SMALL)
            await worker.refused(SMALL, SMALL)
        assert len(await first) == 1
        assert len(await worker.decode(SMALL)) == 1  # nothing waits: admitted
        assert worker.plane._decoding == worker.plane._decoding_work == 0

    worker.run(scenario())


def test_small_images_behind_small_ones_are_admitted(monkeypatch: pytest.MonkeyPatch) -> None:
    # 40 small images waiting are ~6 ms of decoding: far within the budget.
    worker = Worker(monkeypatch)

    async def scenario() -> None:
        await worker.decode(SMALL)
        async with worker.held():
            waiting = [await worker.queued(SMALL) for _ in range(40)]
        assert [len(await task) for task in waiting] == [1] * 40

    worker.run(scenario())


def test_a_requests_own_images_are_not_its_wait_but_the_next_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two huge images behind a small one wait for the small one alone: admitted, though
    # decoding them takes 0.64 s; a small image behind them waits for those 0.64 s:
    # refused. (Counting a request's own images too cut the goodput of 16-image
    # requests at 4x to ~55% of capacity.)
    worker = Worker(monkeypatch)

    async def scenario() -> None:
        await worker.decode(SMALL)
        async with worker.held():
            first = await worker.queued(SMALL)
            second = await worker.queued(HUGE, HUGE)
            await worker.refused(SMALL)
        assert (len(await first), len(await second)) == (1, 2)

    worker.run(scenario())


def test_a_list_is_refused_on_the_queued_work_before_its_headers_are_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Bytes that are no image at all are refused for the load, not as bad images: the
    # refusal costs no header read.
    worker = Worker(monkeypatch)

    async def scenario() -> None:
        await worker.decode(SMALL)
        async with worker.held():
            first = await worker.queued(HUGE)
            await worker.refused(b"no image", b"none")
        await first

    worker.run(scenario())


def test_before_any_decoding_is_measured_huge_images_still_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A fresh worker's first burst: counted at the unmeasured rate (10 ns a pixel).
    worker = Worker(monkeypatch)

    async def scenario() -> None:
        async with worker.held():
            first = await worker.queued(HUGE)
            await worker.refused(HUGE)
        await first

    worker.run(scenario())


def test_decode_work_counts_bytes_where_they_outweigh_pixels() -> None:
    # A JPEG decoded at 1/8 scale still reads all its data: 400 KB for 12,288 pixels.
    per_image = dataplane.DECODE_PIXELS_PER_IMAGE
    assert dataplane._decode_work(bytes(400_000), 12_288) == 200_000 + per_image
    assert dataplane._decode_work(bytes(200_000), 36_000_000) == 36_000_000 + per_image
