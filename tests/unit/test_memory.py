"""Freed heap memory given back to the system (service.memory)."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import pytest

from service import memory
from service.memory import malloc_trim, resident_bytes, trim_memory

MB = 1024 * 1024


def test_malloc_trim_gives_back_what_a_thread_freed() -> None:
    """What a thread allocated and freed stays resident (glibc keeps it in the thread's
    arena) until malloc_trim: a worker's grew 115 -> 434 MB under gRPC bursts, kept."""
    trim = malloc_trim()
    assert trim is not None  # glibc, as on every machine the tests run on

    def churn() -> None:
        held = [bytes(1000) for _ in range(200_000)]  # ~200 MB of small blocks
        del held

    thread = threading.Thread(target=churn)
    thread.start()
    thread.join()
    before = resident_bytes()
    trim()
    after = resident_bytes()
    assert before is not None and after is not None
    assert after < before - 100 * MB, (before, after)


def trims_for(readings_mb: list[int], monkeypatch: pytest.MonkeyPatch) -> int:
    """How many trims trim_memory makes while resident memory reads these (MB), in turn:
    at start, then at each period, and after each trim."""
    monkeypatch.setattr(memory, "TRIM_GROWTH_BYTES", 32 * MB)
    readings = iter(readings_mb)
    trims: list[int] = []
    done = asyncio.Event()

    def resident() -> int | None:
        value = next(readings, None)
        if value is None:
            done.set()
            return readings_mb[0] * MB  # back at the start: no more trims
        return value * MB

    async def scenario() -> None:
        task = asyncio.create_task(trim_memory(0, lambda: trims.append(1) or 1, resident))
        await done.wait()
        task.cancel()

    asyncio.run(scenario())
    return len(trims)


def test_trims_only_once_resident_memory_grew(monkeypatch: pytest.MonkeyPatch) -> None:
    # 100 floor; 110 no; 140 trims (then reads 100); 120 no; 90 lowers the floor; 125
    # trims (over 90 + 32; then reads 95); 100 no.
    assert trims_for([100, 110, 140, 100, 120, 90, 125, 95, 100], monkeypatch) == 2


def test_a_trim_in_a_burst_does_not_make_the_burst_the_floor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A trim while large images were decoded read their peak (800 MB): what was freed
    after stayed resident for good, since nothing grew 32 MB past that peak."""
    # 100 floor; 800 trims (then reads 790: the burst goes on); 780 trims again (over
    # 100 + 32; then reads 120); 125 no.
    assert trims_for([100, 800, 790, 780, 120, 125], monkeypatch) == 2


def test_a_trim_first_frees_what_reference_cycles_hold() -> None:
    """A closed connection's protocol sits in reference cycles, with what it held: freed
    only by a full collection, which a worker rarely runs on its own (workers held
    0.5-1.7 GB for minutes after bursts of uploads; gc.collect() freed it)."""

    class Held:
        pass

    gc.disable()
    try:
        held = Held()
        held.itself = held  # type: ignore[attr-defined]
        gone = weakref.ref(held)
        del held
        assert gone() is not None  # a cycle: no reference count reaches 0
        trims: list[int] = []
        memory._collect_then(lambda: trims.append(1) or 1)
        assert gone() is None and trims == [1]
    finally:
        gc.enable()
