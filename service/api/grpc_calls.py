"""What every gRPC call shares with REST for its record: the request id it carries and,
for a call refused before a servicer runs it (a missing API key, a malformed message),
the refusal counted, logged and tagged as any other answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any, NoReturn

import grpc

from service.errors import CnnserveError
from service.requestlog import RequestRecord, client_request_id, recorded

# The call metadata that carries a request id, returned in the trailing metadata.
REQUEST_ID_KEY = "x-request-id"
# What gRPC's own retries (a service config's retryPolicy) read of when to try again:
# they do not read retry-after. Milliseconds; negative: not at all (gRPC's retry design,
# A6).
PUSHBACK_KEY = "grpc-retry-pushback-ms"


def call_request_id(metadata: Mapping[str, Any]) -> str:
    """The client's x-request-id (bounded and cleaned), or a fresh one."""
    return client_request_id(str(metadata.get(REQUEST_ID_KEY, "")).encode("utf-8"))


async def end_call(
    context: Any, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()
) -> NoReturn:
    """End the call with ``code``, ``details`` and ``trailers``: gRPC's abort, which
    answers with trailers alone and raises (its handler ends there).

    Trailers alone, because gRPC's own retries (a service config's retryPolicy, such as
    docs/grpc-service-config.json) give up on a call once its answer's headers came: a
    status set on the context and returned (set_code) goes out as headers, an empty
    message and trailers, so a model still loading (UNAVAILABLE) or an overload
    (RESOURCE_EXHAUSTED with its pushback) was never retried, whatever the policy said.

    gRPC keeps the AbortError on the call's state, and its traceback holds the handler's
    frames, whose locals hold the call's state and the request: a reference cycle, so
    every refused call kept its request message until Python's cycle collector ran (ten
    refused 35 MB Predicts: +570 MB in a worker). So the error lets go of its traceback
    (and of the error it was raised while handling) on the event loop's next turn: by
    then gRPC has caught it (it goes up through no await). Not a done callback of the
    call's: gRPC keeps that beside the call's state, itself a cycle."""
    try:
        await context.abort(code, details, trailers)
    except BaseException as ended:
        asyncio.get_running_loop().call_soon(_let_go, ended)
        raise
    raise AssertionError("gRPC's abort returned")  # it always raises


def _let_go(ended: BaseException) -> None:
    ended.__traceback__ = ended.__context__ = ended.__cause__ = None


def record_call(
    context: Any, error: CnnserveError, route: str, started: float | None = None
) -> str:
    """Count, log and tag ``error`` as the answer of a call no servicer ran (metrics,
    access log), which began at ``started`` (``time.perf_counter``; by default now);
    returns the call's request id."""
    rid = call_request_id(dict(context.invocation_metadata() or ()))
    record = RequestRecord(rid, "grpc", "POST", route)
    if started is not None:
        record.started = started
    with contextlib.suppress(CnnserveError), recorded(record):
        raise error
    error.with_traceback(None)  # it held this frame, which holds it
    return rid


async def refuse_call(
    context: Any, error: CnnserveError, route: str, started: float | None = None
) -> NoReturn:
    """End the call with ``error`` (see :func:`end_call`: it raises) after recording it
    as a servicer's answer would be; its request id goes back in the trailers."""
    rid = record_call(context, error, route, started)
    await end_call(context, error.grpc_code, error.public_message(), error_trailers(rid, error))


def error_trailers(rid: str, error: CnnserveError) -> tuple[tuple[str, str], ...]:
    """A refused call's trailing metadata: its request id, and ``retry-after`` when the
    error has one (REST's Retry-After).

    A ``RESOURCE_EXHAUSTED`` also says so to gRPC's retries (:data:`PUSHBACK_KEY`): an
    overload's after its retry-after (a client whose policy retries it came back within
    its backoff, 50 ms, adding load where there was none to spare), a call too large
    never (it would be refused the same way each time). ``UNAVAILABLE`` has none: those
    retries go to another connection or replica at once (docs/grpc-service-config.json),
    and an unchecked API key's 10 s would outlast most calls' deadlines."""
    trailers: tuple[tuple[str, str], ...] = ((REQUEST_ID_KEY, rid),)
    if error.retry_after is not None:
        trailers += (("retry-after", str(error.retry_after)),)
    if error.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        pushback = -1 if error.retry_after is None else error.retry_after * 1000
        trailers += ((PUSHBACK_KEY, str(pushback)),)
    return trailers


def refusal_handler(handler: Any, error: CnnserveError, route: str) -> Any:
    """A handler of the same streaming shape as ``handler`` that aborts with ``error``,
    counted, logged and tagged as every call is, as REST's refusals are (refused by an
    interceptor with no record, key guessing over gRPC left no trace)."""

    async def abort(request: Any, context: Any) -> Any:
        await refuse_call(context, error, route)

    async def abort_stream(request: Any, context: Any) -> Any:
        await refuse_call(context, error, route)
        yield  # never reached: makes this an async generator

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    # Request-streaming whatever the method's shape: refused without waiting for a
    # message (a call that never sent one waited, holding a place in gRPC's call cap).
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
    return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
