"""A request that is not a valid protobuf message: INVALID_ARGUMENT, like any bad input.

Left to grpc.aio, a message its deserializer cannot parse is answered UNKNOWN, quoting
protobuf's own error, and logged with a traceback, so any client could fill the log.
This interceptor (the last, so authentication still answers first) makes each
unary-request method's deserializer tolerant: a malformed message becomes a marker,
which the method answers with InvalidRequest's status before running.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from service.api.grpc_calls import refuse_call
from service.errors import InvalidRequest


class _Malformed:
    """Stands for a request message that did not parse."""

    def __init__(self, message_type: str) -> None:
        self.message_type = message_type


async def _refuse(request: _Malformed, context: Any, route: str) -> None:
    await refuse_call(
        context,
        InvalidRequest(
            f"the request is not a valid {request.message_type} message (malformed protobuf)"
        ),
        route,
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


def _unary(behavior: Callable[..., Awaitable[Any]], route: str) -> Callable[..., Awaitable[Any]]:
    async def checked(request: Any, context: Any) -> Any:
        if isinstance(request, _Malformed):
            await _refuse(request, context, route)
        return await behavior(request, context)

    return checked


def _unary_stream(behavior: Callable[..., Any], route: str) -> Callable[..., AsyncIterator[Any]]:
    async def checked(request: Any, context: Any) -> AsyncIterator[Any]:
        if isinstance(request, _Malformed):
            await _refuse(request, context, route)
        result = behavior(request, context)
        if inspect.isasyncgen(result):
            async for item in result:
                yield item
        else:  # a coroutine that writes its responses with context.write
            await result

    return checked


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
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
            known = self._wrapped[method] = (handler, _wrap(handler, method))
        return known[1]


def _wrap(handler: Any, route: str) -> Any:
    kwargs = {
        "request_deserializer": _tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:
        stream = _unary_stream(handler.unary_stream, route)
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, route), **kwargs)
