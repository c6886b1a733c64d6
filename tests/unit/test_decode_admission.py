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
from service.errors import Overloaded
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
    target = SimpleNamespace(
        model="m", spec=PreprocessSpec(), batcher=SimpleNamespace(admit=lambda n, d: None)
    )
    gate = threading.Event()

    async def scenario() -> None:
        deadline = time.monotonic() + 30
        await plane.decode([png], target, deadline)  # type: ignore[arg-type]  # measures 20 ms
        blocker = asyncio.get_running_loop().run_in_executor(pool, gate.wait, 5)
        first = asyncio.create_task(plane.decode([png, png], target, deadline))  # type: ignore[arg-type]
        await until(lambda: plane._decoding == 2)
        second = asyncio.create_task(plane.decode([png, png], target, deadline))  # type: ignore[arg-type]
        await until(lambda: plane._decoding == 4)  # 40 ms were ahead of it: admitted
        with pytest.raises(Overloaded, match="decoded") as shed:
            await plane.decode([png], target, deadline)  # type: ignore[arg-type]  # 80 ms ahead
        assert shed.value.reason == "decode_queue"
        gate.set()
        await blocker
        for task in (first, second):
            admitted.append(len(await task))
        assert plane._decoding == 0
        assert len(await plane.decode([png], target, deadline)) == 1  # load gone: admitted  # type: ignore[arg-type]

    try:
        asyncio.run(asyncio.wait_for(scenario(), 10))
    finally:
        gate.set()
        pool.shutdown()
    assert admitted == [2, 2]
