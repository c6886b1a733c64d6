"""A worker's turns for large JSON bodies (service.api.json_turns): one large body at a
time, small ones never wait, and a wait ends at the request's deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.api.http import LARGE_JSON_BYTES
from service.api.json_turns import JsonTurns
from service.errors import DeadlineExceeded

LARGE = LARGE_JSON_BYTES + 1


def later(seconds: float) -> float:
    return time.monotonic() + seconds


def test_large_bodies_take_turns_and_small_ones_pass() -> None:
    async def run() -> list[str]:
        turns = JsonTurns()
        order: list[str] = []
        inside = asyncio.Event()
        release = asyncio.Event()

        async def first() -> None:
            async with turns.turn(LARGE, later(30)):
                order.append("first in")
                inside.set()
                await release.wait()
                order.append("first out")

        async def second() -> None:
            async with turns.turn(LARGE, later(30)):
                order.append("second in")

        holder = asyncio.create_task(first())
        await inside.wait()
        waiter = asyncio.create_task(second())
        while turns.waiting == 0:  # the second is queued behind the first
            await asyncio.sleep(0)
        async with turns.turn(LARGE_JSON_BYTES, later(30)):  # small: never waits
            order.append("small")
        release.set()
        await asyncio.gather(holder, waiter)
        assert turns.waiting == 0
        return order

    assert asyncio.run(run()) == ["first in", "small", "first out", "second in"]


def test_a_wait_ends_at_the_deadline_with_a_504_and_the_turn_goes_on() -> None:
    async def run() -> None:
        turns = JsonTurns()
        inside = asyncio.Event()
        release = asyncio.Event()

        async def holder() -> None:
            async with turns.turn(LARGE, later(30)):
                inside.set()
                await release.wait()

        held = asyncio.create_task(holder())
        await inside.wait()
        with pytest.raises(DeadlineExceeded, match="JSON body"):
            async with turns.turn(LARGE, later(0.05)):
                raise AssertionError("ran without its turn")
        assert turns.waiting == 0
        release.set()
        await held
        async with turns.turn(LARGE, later(30)):  # the lock was not left taken
            pass

    asyncio.run(run())


def test_a_passed_deadline_waits_for_nothing_but_a_free_turn_is_taken() -> None:
    async def run() -> None:
        turns = JsonTurns()
        async with turns.turn(LARGE, later(-1)):  # free: taken even so (no wait)
            pass

    # asyncio.timeout(0) expires at the first await; a free lock is acquired without one.
    asyncio.run(run())
