"""The fast path for the request that carries the load: ``POST /v1/classify`` with one
image as the raw body.

FastAPI's route machinery (routing, dependency injection, query validation through
pydantic, the response model, three exception-handling layers) cost about a tenth of a
worker's CPU per request under load, more than the HTTP parsing itself. This ASGI
middleware answers that one request shape directly and hands everything else to the
app untouched, before a byte of the body is read: multipart and JSON bodies, any other
method or path, and query strings it does not take at face value (an unknown value form
or a repeated parameter), so that FastAPI's route keeps answering them with its own
validation and messages. What it answers is what the route answers: the same data-plane
call, the same response model and serialisation (``rest.classify_response``), the same
error mapping (``http.answer_error``); tests/integration/test_fastpath.py compares the
two byte for byte.

Under uvicorn with the gateway's HTTP protocol, most such requests never reach the app:
the protocol answers them itself (service.api.direct_classify, cheaper again). This
middleware answers those it leaves: pipelined behind another request, chunked, with
``Expect: 100-continue``, or with the direct path turned off.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import rest
from service.api.http import (
    answer_error,
    client_key,
    dataplane,
    request_deadline,
    request_id,
)
from service.api.rest import CLASSIFY_PATH, classify_response
from service.preprocessing import SUPPORTED_MEDIA_TYPES

# The raw-body content types the route reads as one image (see rest.read_images).
RAW_TYPES = frozenset({*SUPPORTED_MEDIA_TYPES, "application/octet-stream"})
# Query values taken at face value; anything else goes to the route to be validated.
_INTEGER = re.compile(r"[0-9]{1,9}")
_INTEGER_PARAMS = frozenset({"top_k", "version"})
_TEXT_PARAMS = frozenset({"model", "label"})


class ClassifyFastPath:
    """Pure ASGI middleware; sits inside RequestGuard (ids, admission, body limits,
    metrics and access log apply to both paths alike)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # The route it stands in for: named in metrics and the access log.
        self._route = next(
            r for r in rest.router.routes if getattr(r, "path", None) == CLASSIFY_PATH
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = self._taken(scope)
        if query is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self._route
        request = Request(scope, receive)
        try:
            plane = dataplane(request)
            deadline = request_deadline(plane, request)
            image = await request.body()
            result = await plane.classify(
                [image],
                model=query.get("model"),
                version=query_int(query.get("version")),
                label=query.get("label"),
                k=query_int(query.get("top_k")),
                deadline=deadline,
                client_key=client_key(request),
            )
            response = classify_response(result, several=False)
        except Exception as exc:  # mapped once, as every route's errors are
            await answer_error(exc, request_id(request))(scope, receive, send)
            return
        await response(scope, receive, send)

    @staticmethod
    def _taken(scope: Scope) -> dict[str, str] | None:
        """The query parameters, when this request is one the fast path answers."""
        if scope["type"] != "http":
            return None
        return raw_classify_query(
            scope["method"], scope["path"], scope["headers"], scope.get("query_string", b"")
        )


def raw_classify_query(
    method: str, path: str, headers: Sequence[tuple[bytes, bytes]], query_string: bytes
) -> dict[str, str] | None:
    """The query parameters of a raw-body ``POST /v1/classify`` whose query values can be
    taken at face value; None for any other request (the route answers it). What the
    fast path here and the HTTP protocol's direct path (service.api.direct_classify)
    take."""
    if method != "POST" or path != CLASSIFY_PATH:
        return None
    types = [value for key, value in headers if key == b"content-type"]
    if len(types) != 1:
        return None  # the route refuses a second Content-Type, and a body of no type
    media = types[0].split(b";", 1)[0].strip().lower().decode("latin-1")
    if media not in RAW_TYPES:
        return None
    return face_value_query(query_string)


def face_value_query(query_string: bytes) -> dict[str, str] | None:
    """/v1/classify's query parameters when each can be taken at face value (known, sent
    once, integers as plain digits); None when the route's validation has a say."""
    query: dict[str, str] = {}
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key in query:
            return None  # repeated: the route decides which one counts
        if key in _INTEGER_PARAMS and not _INTEGER.fullmatch(value):
            return None  # the route's validation says what is wrong with it
        if key not in _INTEGER_PARAMS and key not in _TEXT_PARAMS:
            return None  # the route refuses what it does not know (a typo)
        query[key] = value
    return query


def query_int(value: str | None) -> int | None:
    return None if value is None else int(value)
