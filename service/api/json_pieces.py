"""json.loads for large bodies, in pieces the event loop can run between.

json's C scanner holds the GIL for a whole document: parsing a 9.6 MB ``:predict`` body
of pixel lists in a thread stopped its worker's event loop for ~0.35 s, every other
request and probe of the worker waiting (a thread alone does not help: the scanner calls
no Python code between values, where the interpreter would hand the GIL over).

:func:`loads_in_pieces` gives what ``json.loads(text, object_pairs_hook=...)`` gives,
but walks the outer arrays and objects itself and leaves their elements to the C scanner
(``raw_decode``) one at a time, so the GIL changes hands every switch interval (5 ms)
between them. It descends only as far as elements are large: once an array's element
is under :data:`PIECE_CHARS` (an image's row of pixels), its siblings are parsed whole,
one each; an array of scalars, or of elements under :data:`MIN_PIECE_CHARS` (a row's
pixels), is parsed whole at once, as a step per number would cost more than parsing.
Its steps are bounded by the text's length (:data:`MIN_PIECE_CHARS` a step), so no
document makes it cost much more than json.loads.

It does not have to be right about documents that do not parse, nor about those it
gives up on: then json.loads parses the text again and its value or error is the answer.

Most of what parsing a large body cost was not parsing: every few hundred lists made,
Python's cycle collector ran, and each of its older collections walked every list made
so far (and the worker's own objects), ~2/3 of the time. :func:`collector_paused` holds
the collector off while a body is parsed and turned into arrays: a body's lists and
dicts hold no cycles, and they are freed by their reference counts when the request
lets go of them.
"""

from __future__ import annotations

import gc
import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# Elements this long or longer are walked into, shorter ones parsed whole. A row of 224
# RGB pixels is ~3-10 K characters (~0.1-0.3 ms to parse), an image of them ~1-2 M.
PIECE_CHARS = 64 * 1024
# An array whose first element is shorter than this is parsed whole.
MIN_PIECE_CHARS = 256
# How deep the walk goes before leaving the rest to the scanner, which has a recursion
# limit of its own (its error is the one json.loads gives).
MAX_DEPTH = 16

# JSON's whitespace (RFC 8259), matched as json itself matches it: in C, however long a
# run (a loop over the characters took ~0.5 s for 10 MB of spaces).
_WHITESPACE = re.compile(r"[ \t\n\r]*")

PairsHook = Callable[[list[tuple[str, Any]]], Any]


class _GiveUp(Exception):
    """Not what the walk parses (likely an error): json.loads answers instead."""


def loads_in_pieces(text: str, object_pairs_hook: PairsHook) -> Any:
    """``json.loads(text, object_pairs_hook=object_pairs_hook)``, the GIL handed over
    between pieces (module doc)."""
    try:
        walk = _Walk(text, object_pairs_hook)
        value, end = walk.value(_skip(text, 0), 0)
        if _skip(text, end) == len(text):
            return value
    except (_GiveUp, ValueError, RecursionError):
        pass
    return json.loads(text, object_pairs_hook=object_pairs_hook)


def _skip(text: str, at: int) -> int:
    return _WHITESPACE.match(text, at).end()  # type: ignore[union-attr]  # * always matches


class _Walk:
    def __init__(self, text: str, pairs_hook: PairsHook) -> None:
        self.text = text
        self.scan = json.JSONDecoder(object_pairs_hook=pairs_hook).raw_decode
        self.pairs_hook = pairs_hook
        self.steps_left = 64 + len(text) // MIN_PIECE_CHARS

    def _step(self) -> None:
        self.steps_left -= 1
        if self.steps_left < 0:
            raise _GiveUp

    def value(self, at: int, depth: int) -> tuple[Any, int]:
        """The value that starts at ``at`` (not whitespace), and where it ends."""
        self._step()
        opening = self.text[at : at + 1]
        if depth >= MAX_DEPTH or opening not in ("[", "{"):
            return self.scan(self.text, at)
        if opening == "[":
            return self._array(at, depth + 1)
        return self._object(at, depth + 1)

    def _array(self, start: int, depth: int) -> tuple[Any, int]:
        text = self.text
        at = _skip(text, start + 1)
        if text[at : at + 1] not in ("[", "{"):  # scalars, or empty
            return self.scan(text, start)
        item, end = self.value(at, depth)
        if end - at < MIN_PIECE_CHARS:
            return self.scan(text, start)
        items = [item]
        while True:
            whole = end - at < PIECE_CHARS
            at, done = self._next(end, "]")
            if done:
                return items, at
            if whole:
                self._step()
                item, end = self.scan(text, at)
            else:
                item, end = self.value(at, depth)
            items.append(item)

    def _object(self, start: int, depth: int) -> tuple[Any, int]:
        text = self.text
        at = _skip(text, start + 1)
        pairs: list[tuple[str, Any]] = []
        if text[at : at + 1] == "}":
            return self.pairs_hook(pairs), at + 1
        while True:
            if text[at : at + 1] != '"':
                raise _GiveUp
            key, end = self.scan(text, at)
            at = _skip(text, end)
            if text[at : at + 1] != ":":
                raise _GiveUp
            item, end = self.value(_skip(text, at + 1), depth)
            pairs.append((key, item))
            at, done = self._next(end, "}")
            if done:
                return self.pairs_hook(pairs), at

    def _next(self, end: int, closing: str) -> tuple[int, bool]:
        """After an element that ended at ``end``: where the next one starts, False; or
        where the container ends, True, when ``closing`` comes first."""
        text = self.text
        at = _skip(text, end)
        mark = text[at : at + 1]
        if mark == closing:
            return at + 1, True
        if mark != ",":
            raise _GiveUp
        return _skip(text, at + 1), False


_pauses = 0
_resume = False  # whether the collector was on when the first pause began
_pauses_lock = threading.Lock()


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector held off for the block (module doc), in whatever
    thread; it runs again once no block holds it off, if it ran before the first."""
    global _pauses, _resume
    with _pauses_lock:
        if _pauses == 0:
            _resume = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pauses_lock:
            _pauses -= 1
            if _pauses == 0 and _resume:
                gc.enable()
