"""API keys: who may call the gateway, checked once per request on both transports.

With ``CNNSERVE_API_KEYS`` (or ``CNNSERVE_API_KEYS_FILE``) set, a REST request needs
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, a gRPC call ``authorization:
Bearer <key>`` metadata; otherwise it gets 401 / UNAUTHENTICATED. Probes stay open
(``/healthz``, ``/readyz``, gRPC health), as do the API docs and the demo page's own
files (not its data); ``/metrics`` is open unless ``CNNSERVE_METRICS_REQUIRE_KEY``.

A presented key is hashed and compared with every known key's hash by
:func:`hmac.compare_digest`, always against all of them, so the time taken says nothing
about how much of a key was right, nor which key matched. Keys are never logged: the
error says only that a key was missing or unknown.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from service.api.grpc_calls import refuse_call
from service.errors import Unauthenticated

BEARER = "bearer "
API_KEY_HEADER = "x-api-key"
# Open to everyone whatever the settings: probes, the API description, the demo page's
# own HTML/JS/CSS (its data under /demo/models needs the key like any API route).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/"})
OPEN_PREFIXES = ("/demo/static/", "/static-offline-docs/", "/docs/")
# gRPC services probes and tooling reach without a key.
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/",)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class ApiKeys:
    """The known keys (as hashes) and the check of a presented one."""

    def __init__(
        self, keys: Iterable[str], *, metrics_path: str = "", protect_metrics: bool = False
    ):
        self._digests = [_digest(k) for k in keys]
        self.open_paths = (
            OPEN_PATHS if protect_metrics or not metrics_path else OPEN_PATHS | {metrics_path}
        )

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(OPEN_PREFIXES)

    def check(self, presented: str | None) -> None:
        """Pass, or raise Unauthenticated (the same message for a wrong key and none)."""
        if not self._digests:
            return
        if presented:
            digest = _digest(presented)
            matched = False
            for known in self._digests:  # no early exit: every key is compared
                matched |= hmac.compare_digest(digest, known)
            if matched:
                return
        raise Unauthenticated(
            "a valid API key is required: send 'Authorization: Bearer <key>' (or 'X-API-Key: "
            "<key>'; gRPC: 'authorization' metadata)"
            if not presented
            else "the API key is not valid; check the key you were given"
        )


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key a client sent, from ``Authorization: Bearer`` or ``X-API-Key``."""
    if authorization and authorization[: len(BEARER)].lower() == BEARER:
        return authorization[len(BEARER) :].strip()
    return api_key.strip() if api_key else None


class GrpcApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without a valid key (UNAUTHENTICATED), except health checks."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        details: Any,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or str(details.method).startswith(OPEN_GRPC_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        try:
            self._keys.check(
                presented_key(metadata.get("authorization"), metadata.get(API_KEY_HEADER))
            )
        except Unauthenticated as exc:
            return _refusal(handler, exc, str(details.method))
        return handler


def _refusal(handler: Any, error: Unauthenticated, route: str) -> Any:
    """A handler of the same streaming shape as ``handler`` that aborts with ``error``,
    counted, logged and tagged as every call is (REST's 401s are): refused over gRPC,
    key guessing left no trace."""

    async def abort(request: Any, context: Any) -> Any:
        await refuse_call(context, error, route)

    async def abort_stream(request: Any, context: Any) -> Any:
        await abort(request, context)
        yield  # pragma: no cover  (makes this an async generator)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    # Request-streaming whatever the method's shape: refused without waiting for a
    # message (a call that never sent one waited, holding a place in gRPC's call cap).
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
    return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
