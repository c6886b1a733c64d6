"""Large JSON bodies, expanded one at a time in a worker.

json.loads makes a Python object of every value in a body, and the objects outlive the
parse: a :predict body's pixel lists until they are arrays (service.api.json_pieces). A
9.4 MB :predict body of pixels (11 images) is ~110 MB of floats and lists; eight of them
at once took a worker from 112 MB to a peak of 1.19 GB (329 MB after). A body of empty
lists (``[[], [], …]``) expands ~20 times. The body budget
(``CNNSERVE_MAX_BUFFERED_BODY_BYTES``) bounds the bodies a worker holds, not what they
expand into.

So a request whose JSON body is over :data:`service.api.http.LARGE_JSON_BYTES` parses
it, and holds what it parsed, only in its worker's turn (:meth:`JsonTurns.turn`); the
others wait for theirs, each until its deadline (504 ``deadline_exceeded``). Parsing
holds the GIL, so bodies parsed side by side take as long in all as one after another:
the turns cost large bodies their order, not their throughput. Smaller bodies (an
image or two in base64, a few rows of pixels) never wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.requests import Request

from service.api.http import LARGE_JSON_BYTES, dataplane, request_deadline
from service.errors import DeadlineExceeded

JSON_TURNS_STATE = "json_turns"


class JsonTurns:
    """One worker's turns for expanding large JSON bodies (module doc)."""

    def __init__(self) -> None:
        self._turn = asyncio.Lock()
        self.waiting = 0  # requests waiting for a turn (for tests and the curious)

    @asynccontextmanager
    async def turn(self, size: int, deadline: float) -> AsyncIterator[None]:
        """The block runs in this worker's turn when ``size`` (the body's bytes) is
        large, at once otherwise; DeadlineExceeded when ``deadline``
        (``time.monotonic``) passes first."""
        if size <= LARGE_JSON_BYTES:
            yield
            return
        self.waiting += 1
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._turn.acquire()
        except TimeoutError:
            raise DeadlineExceeded(
                "the request deadline passed while it waited to parse its JSON body "
                f"(over {LARGE_JSON_BYTES // 1024} KiB: a worker parses one such body at "
                "a time); send pixels as encoded images (b64), or fewer at a time"
            ) from None
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._turn.release()


@asynccontextmanager
async def json_turn(request: Request) -> AsyncIterator[None]:
    """:meth:`JsonTurns.turn` for ``request``'s body, within its deadline."""
    turns: JsonTurns = getattr(request.app.state, JSON_TURNS_STATE)
    size = len(await request.body())
    async with turns.turn(size, request_deadline(dataplane(request), request)):
        yield
