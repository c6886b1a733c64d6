"""A unary call's request message, read with a bound: a message that is not valid
protobuf is INVALID_ARGUMENT, like any bad input, and one that does not arrive within
CNNSERVE_BODY_READ_TIMEOUT_SECONDS is DEADLINE_EXCEEDED (request_timeout), as REST's
slow bodies get 408.

Left to grpc.aio, a message its deserializer cannot parse is answered UNKNOWN, quoting
protobuf's own error, and logged with a traceback, so any client could fill the log; and
a call that sends its headers but never its message waits for it as long as the
connection lives, holding one of the places of gRPC's cap on calls in progress (1,024
such calls, without a key, shut out every call, health checks included). This
interceptor (the last, so authentication still answers first) serves each
unary-request method as a request-streaming one that reads the first message itself:
its deserializer is tolerant (a malformed message becomes a marker, answered with
InvalidRequest's status before the method runs) and the read has a timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from service.api.grpc_calls import record_call, refuse_call
from service.errors import (
    ClientClosedRequest,
    CnnserveError,
    DeadlineExceeded,
    InvalidRequest,
    RequestTimeout,
    ShuttingDown,
)

Stopping = Callable[[], bool]


class _Malformed:
    """Stands for a request message that did not parse."""

    def __init__(self, message_type: str) -> None:
        self.message_type = message_type


async def _refuse(request: _Malformed, context: Any, route: str, started: float) -> NoReturn:
    await refuse_call(
        context,
        InvalidRequest(
            f"the request is not a valid {request.message_type} message (malformed protobuf)"
        ),
        route,
        started,
    )


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_type = getattr(
        getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None), "full_name", "protobuf"
    )

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return _Malformed(message_type)

    return deserialize


# How long a call whose stream ended without a message waits to learn whether it was
# cancelled (see _first_message): a few event-loop turns are enough; this is ample.
CANCELLATION_GRACE_SECONDS = 0.1

CANCELLED = (
    "the call was cancelled before its request was read: by its client, or by gRPC "
    "refusing its message (over the size limit, or not decompressible)"
)


STOPPED = "the server stopped before the call's request was read; retry on another replica"


def _never() -> bool:
    return False


# How long a call may wait for its request message while a listener is crowded with
# calls waiting for theirs (see Waiting).
CROWDED_READ_SECONDS = 1.0


class Waiting:
    """The calls of one listener waiting for their request message, and how long each
    may wait: ``timeout``, or :data:`CROWDED_READ_SECONDS` while ``crowd`` or more wait.

    A call waiting for its message holds a place of gRPC's cap on the listener's calls in
    progress (its core refuses beyond it, health checks included). 400 connections
    sending 32 calls' headers each and never a message held every place for the whole
    timeout (30 s): every other client, health checks included, got RESOURCE_EXHAUSTED,
    at ~0.3 s of the sender's work a burst. While crowded, the waits are cut short: the
    places come back within a second, and holding them takes a cap's worth of new calls
    every second. A call whose message is on its way is read in a turn or two of the
    event loop, far under it."""

    def __init__(self, timeout: float, crowd: int) -> None:
        self.timeout = timeout
        self.short = min(timeout, CROWDED_READ_SECONDS)
        self.crowd = max(1, crowd)
        self._calls: dict[asyncio.Timeout, float] = {}  # its timeout, when it began
        self._crowded = False

    def enter(self, scope: asyncio.Timeout, now: float) -> None:
        calls = self._calls
        calls[scope] = now
        if not self._crowded and len(calls) >= self.crowd:
            self._crowded = True
            for waiter, began in calls.items():  # once an episode: not per call
                waiter.reschedule(min(waiter.when() or math.inf, began + self.short))
        scope.reschedule(now + (self.short if self._crowded else self.timeout))

    def leave(self, scope: asyncio.Timeout) -> None:
        calls = self._calls
        calls.pop(scope, None)
        if self._crowded and len(calls) < self.crowd // 2:
            self._crowded = False  # the waits cut short stay short


async def _first_message(
    context: Any, route: str, waiting: Waiting, stopping: Callable[[], bool] = _never
) -> Any:
    """The call's request message; the call refused (gRPC's abort, which raises) when
    none came or it did not parse.
    ``stopping`` says whether the server is stopping: a call its stop cancels is then
    the server's 503, not the client's 499."""
    started = time.perf_counter()  # the access log's duration: the wait included
    loop = asyncio.get_running_loop()
    began = loop.time()
    scope = asyncio.timeout(None)
    try:
        async with scope:  # wait_for would swallow a cancellation
            waiting.enter(scope, began)
            try:
                request = await context.read()
            finally:
                waiting.leave(scope)
        if request is grpc.aio.EOF:
            # The stream ended without a message: a client half-closing it, or a call
            # cancelled (by its client, or by gRPC refusing the message), which grpc.aio
            # tells this task a moment after the read by cancelling it (its
            # context.cancelled() never says so). Answered at once, a cancelled call was
            # counted as the client's 400, and its answer failed with a traceback in the
            # log whenever the cancellation came first.
            await asyncio.sleep(CANCELLATION_GRACE_SECONDS)
    except TimeoutError:
        allowed = (scope.when() or began) - began
        cut = " (many calls were waiting for theirs)" if allowed < waiting.timeout else ""
        await refuse_call(
            context,
            RequestTimeout(f"the request message did not arrive within {allowed:.3g} s{cut}"),
            route,
            started,
        )
    except asyncio.CancelledError:  # gRPC's core ended the call: a deadline, a stop, or not
        why = ShuttingDown(STOPPED) if stopping() else ClientClosedRequest(CANCELLED)
        record_call(context, _ended(context, why), route, started)
        raise
    if request is grpc.aio.EOF:
        await refuse_call(context, _ended(context, InvalidRequest(NO_MESSAGE)), route, started)
    if isinstance(request, _Malformed):
        await _refuse(request, context, route, started)
    return request


NO_MESSAGE = "the call ended without a request message"


def _ended(context: Any, otherwise: CnnserveError) -> CnnserveError:
    """Why a call ended before its request message was read: its deadline passed (under
    load a call can wait that long for the event loop: 542 in one overload run were
    counted as the client's 400); else ``otherwise``."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return DeadlineExceeded("the call's deadline passed before its request was read")
    return otherwise


def _unary(
    behavior: Callable[..., Awaitable[Any]], route: str, waiting: Waiting, stopping: Stopping
) -> Callable[..., Awaitable[Any]]:
    async def checked(requests: Any, context: Any) -> Any:
        request = await _first_message(context, route, waiting, stopping)
        return await behavior(request, context)

    return checked


def _unary_stream(
    behavior: Callable[..., Any], route: str, waiting: Waiting, stopping: Stopping
) -> Callable[..., AsyncIterator[Any]]:
    async def checked(requests: Any, context: Any) -> AsyncIterator[Any]:
        request = await _first_message(context, route, waiting, stopping)
        result = behavior(request, context)
        if inspect.isasyncgen(result):
            async for item in result:
                yield item
        else:  # a coroutine that writes its responses with context.write
            await result

    return checked


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self, read_timeout: float, stopping: Stopping = _never, crowd: int | None = None
    ) -> None:
        """``crowd``: how many calls of its listener waiting for their message make it
        crowded (see :class:`Waiting`; None: never)."""
        self._waiting = Waiting(read_timeout, crowd or 2**62)
        self._stopping = stopping
        # Per method (only methods that exist: a handler was found), its handler and
        # the wrapped one: a method's handler is the same object on every call.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method = str(details.method)
        known = self._wrapped.get(method)
        if known is None or known[0] is not handler:
            known = self._wrapped[method] = (
                handler,
                _wrap(handler, method, self._waiting, self._stopping),
            )
        return known[1]


def _wrap(handler: Any, route: str, waiting: Waiting, stopping: Stopping) -> Any:
    kwargs = {
        "request_deserializer": _tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:
        stream = _unary_stream(handler.unary_stream, route, waiting, stopping)
        return grpc.stream_stream_rpc_method_handler(stream, **kwargs)
    return grpc.stream_unary_rpc_method_handler(
        _unary(handler.unary_unary, route, waiting, stopping), **kwargs
    )
