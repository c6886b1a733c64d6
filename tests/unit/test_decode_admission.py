"""The data plane's decode-pool admission: seconds of decoding queued, not items."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from service import dataplane
from service.config import Settings
from service.dataplane import DataPlane
from service.errors import ModelNotFound, Overloaded
from service.preprocessing import PreprocessSpec
from tests.helpers.core import until
from tests.helpers.images import encode, gradient


def test_decode_queue_sheds_by_seconds_of_decoding_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every image "takes" 20 ms to decode (as measured on the decode thread).
    def fake_decode(opened: object, spec: PreprocessSpec) -> tuple[Any, float]:
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
    # 10 ms of CPU per image on 1 thread; 4 images decoding are 40 ms ahead: admitted
    # with a 50 ms budget, until decoding is seen taking twice what was foreseen.
    plane = idle_plane(Settings(queue_wait_budget_seconds=0.05))
    plane._decode_cost, plane._decoding = 0.010, 4
    plane._admit_decode("m", 1)
    now = time.monotonic()
    plane._decode_waits.note(0.100, 0.050, now)
    with pytest.raises(Overloaded, match="decoded") as shed:
        plane._admit_decode("m", 1)
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
