"""Freed heap memory given back to the system while a worker runs.

glibc's allocator keeps memory freed inside its arenas (gRPC's threads each get one)
rather than return it: after bursts of hostile gRPC calls (400 connections of calls that
never send their message) a worker's resident memory went 115 -> 434 MB and stayed there,
of which malloc_trim(0) gave back 262 MB at once. A worker calls it every
:data:`TRIM_SECONDS`, off the event loop, after a full garbage collection
(:func:`_collect_then`)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import time
from collections.abc import Callable

from service.periodic import every

log = logging.getLogger(__name__)

TRIM_SECONDS = 30.0
# Trimmed only once resident memory grew this much since the last trim: a trim holds each
# arena's lock in turn (5-9 ms in all on a serving worker, 30-55 ms on a bloated heap).
TRIM_GROWTH_BYTES = 32 * 1024 * 1024


def malloc_trim() -> Callable[[], int] | None:
    """glibc's malloc_trim(0), or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def call() -> int:
        return int(trim(0))

    return call


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), or None."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _collect_then(trim: Callable[[], int]) -> None:
    """A full garbage collection, then the trim: what a reference cycle holds (a closed
    connection's protocol and the request bodies it kept) is freed only by a full
    collection, which a worker rarely runs on its own. After bursts of uploads, workers
    held 0.5-1.7 GB for minutes, 1.2 GB of it still allocated (so no trim could give it
    back); gc.collect() freed it (1,147 -> 132 MB). A full collection takes a few ms
    here (the heap loaded at start is frozen out of it), holding the GIL meanwhile."""
    gc.collect()
    trim()


async def trim_memory(
    period: float = TRIM_SECONDS,
    trim: Callable[[], int] | None = None,
    resident: Callable[[], int | None] = resident_bytes,
) -> None:
    """Give freed memory back every ``period`` seconds while resident memory is
    :data:`TRIM_GROWTH_BYTES` over the least it has been (at start, or after a trim),
    for good (cancel to stop). The least, not the last trim's result: a trim during a
    burst of large images read the burst's peak as the floor, and the ~650 MB freed after
    it were kept for good (nothing grew 32 MB past that peak)."""
    trim = trim or malloc_trim()
    if trim is None:
        return
    floor = resident()

    async def once() -> None:
        nonlocal floor
        now = resident()
        if now is not None and floor is not None and now < floor + TRIM_GROWTH_BYTES:
            floor = min(floor, now)
            return
        started = time.perf_counter()
        await asyncio.to_thread(_collect_then, trim)
        after = resident()
        floor = after if floor is None or after is None else min(floor, after)
        log.debug(
            "malloc_trim in %.1f ms: resident %s -> %s bytes",
            (time.perf_counter() - started) * 1e3,
            now,
            after,
        )

    await every(period, once, "returning freed memory to the system")
