"""service.api.json_pieces: json.loads' value or error, in pieces the event loop runs
between, with the cycle collector held off."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api import json_pieces
from service.api.http import _objects_of_unique_keys
from service.api.json_pieces import collector_paused, loads_in_pieces
from service.api.tfserving_rest import _b64_value
from service.errors import InvalidRequest

HOOK = _objects_of_unique_keys(_b64_value)  # what a :predict body is parsed with


@contextmanager
def small_pieces() -> Iterator[None]:
    """Pieces of a few characters, so that small documents take every path of the walk
    (descending, siblings whole, arrays whole)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(json_pieces, "PIECE_CHARS", 12)
        patch.setattr(json_pieces, "MIN_PIECE_CHARS", 4)
        yield


def outcome(parse: Any, text: str) -> tuple[str, Any]:
    try:
        return "value", parse(text)
    except (ValueError, RecursionError, InvalidRequest) as exc:
        return type(exc).__name__, str(exc)


def by_json(text: str) -> Any:
    return json.loads(text, object_pairs_hook=HOOK)


def by_pieces(text: str) -> Any:
    return loads_in_pieces(text, HOOK)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.builds(lambda b: {"b64": b}, st.sampled_from(["aGk=", "AAEC", "not base64!"])),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=60,
)


@settings(deadline=None, max_examples=300)
@given(json_values, st.sampled_from([None, 1, 2]), st.booleans())
def test_the_value_is_json_loads(value: Any, indent: int | None, pad: bool) -> None:
    text = json.dumps(value, indent=indent)
    text = f" \n{text}\t " if pad else text
    with small_pieces():
        assert outcome(by_pieces, text) == outcome(by_json, text)


@settings(deadline=None, max_examples=300)
@given(json_values, st.data())
def test_a_broken_document_gets_json_loads_error(value: Any, data: Any) -> None:
    text = json.dumps(value)
    at = data.draw(st.integers(0, len(text)))
    cut = data.draw(st.integers(0, 3))
    inserted = data.draw(st.sampled_from(["", ",", "]", "}", "[", "{", ":", '"', " ", "x", "1"]))
    broken = text[:at] + inserted + text[at + cut :]
    with small_pieces():
        assert outcome(by_pieces, broken) == outcome(by_json, broken)


@pytest.mark.parametrize(
    "text",
    [
        '{"a": [[1, 2], [3, 4]], "a": 1}',  # a key twice: the hook's refusal
        '[[{"b64": "####"}], [1]]',  # not base64: the hook's refusal
        "[[1, 2], [3, 4]] [5]",  # extra data after the value
        "[" * 100_000 + "]" * 100_000,  # deeper than the scanner goes
        "[[1, 2], [3, 4]",  # never closed
        '{"x": NaN, "y": [[Infinity], [-Infinity]]}',  # json.loads' own words
        "[[1, 2],\n [3,, 4]]",
        '{"a" 1}',
        "[1" + "0" * 5000 + "]",  # past Python's digit limit
    ],
)
def test_refusals_and_oddities_are_json_loads(text: str) -> None:
    with small_pieces():
        assert outcome(by_pieces, text) == outcome(by_json, text)
    assert outcome(by_pieces, text) == outcome(by_json, text)


def pixel_body(images: int) -> str:
    row = [[(x * 7) % 256, (x * 13) % 256, (x * 31) % 256] for x in range(224)]
    return json.dumps({"signature_name": "", "instances": [[row] * 224] * images})


def longest_stop(parse: Any) -> tuple[float, float]:
    """(the event loop's longest stop, the parse's time) while ``parse`` runs in a
    thread; the loop wakes every millisecond."""

    async def measure() -> tuple[float, float]:
        started = time.perf_counter()
        running = asyncio.ensure_future(asyncio.to_thread(parse))
        longest, last = 0.0, time.perf_counter()
        while not running.done():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
        await running
        return longest, time.perf_counter() - started

    return asyncio.run(measure())


def test_the_event_loop_runs_while_a_large_body_parses() -> None:
    """json.loads held the GIL for the whole body: the loop stopped for as long as the
    parse took (~0.35 s for 9.6 MB in a worker). In pieces it runs every few ms."""
    text = pixel_body(16)  # ~12 MB

    def parse() -> None:
        with collector_paused():
            loads_in_pieces(text, HOOK)

    def parse_whole() -> None:
        with collector_paused():
            json.loads(text, object_pairs_hook=HOOK)

    stop, took = min(longest_stop(parse) for _ in range(3))
    assert stop < took / 4, (stop, took)
    whole_stop, whole_took = max(longest_stop(parse_whole) for _ in range(2))
    assert whole_stop > whole_took / 2, (whole_stop, whole_took)  # the measurement tells


def test_many_small_elements_after_a_large_one_cost_no_more_than_a_step_each() -> None:
    """Elements are walked into while they are large; a crafted array of one large
    element and 200,000 empty ones would cost a step each: the walk gives up past a
    step per MIN_PIECE_CHARS of text, and json.loads parses it."""
    text = "[" + pixel_body(1) + "," + ",".join(["[]"] * 200_000) + "]"
    walk = json_pieces._Walk(text, HOOK)
    with pytest.raises(json_pieces._GiveUp):
        walk.value(0, 0)
    assert by_pieces(text) == by_json(text)


def test_long_runs_of_whitespace_cost_what_they_cost_json_loads() -> None:
    """Whitespace between pieces is skipped as json skips it, in C: a loop over its
    characters took ~0.5 s for 10 MB of spaces, ~50 times json.loads' time."""
    text = "[" + " " * 10_000_000 + "[1],\n" + "\t" * 1_000_000 + "[2]]"

    def fastest(parse: Any) -> float:
        times = []
        for _ in range(3):
            began = time.perf_counter()
            assert parse(text) == [[1], [2]]
            times.append(time.perf_counter() - began)
        return min(times)

    assert fastest(by_pieces) < 10 * fastest(by_json) + 0.01


def test_the_collector_is_held_off_while_any_pause_lasts_and_comes_back() -> None:
    assert gc.isenabled()
    entered, leave = threading.Event(), threading.Event()

    def other() -> None:
        with collector_paused():
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=other)
    with collector_paused():
        thread.start()
        assert entered.wait(10)
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread's pause still holds it
    leave.set()
    thread.join(10)
    assert gc.isenabled()


def test_a_collector_turned_off_before_stays_off() -> None:
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
