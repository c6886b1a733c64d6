"""What every gRPC call shares with REST for its record: the request id it carries and,
for a call refused before a servicer runs it (a missing API key, a malformed message),
the refusal counted, logged and tagged as any other answer."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from service.errors import CnnserveError
from service.requestlog import RequestRecord, client_request_id, recorded

# The call metadata that carries a request id, returned in the trailing metadata.
REQUEST_ID_KEY = "x-request-id"


def call_request_id(metadata: Mapping[str, Any]) -> str:
    """The client's x-request-id (bounded and cleaned), or a fresh one."""
    return client_request_id(str(metadata.get(REQUEST_ID_KEY, "")).encode("utf-8"))


async def refuse_call(context: Any, error: CnnserveError, route: str) -> None:
    """Abort the call with ``error`` after recording it (metrics, access log) as a
    servicer's answer would be; its request id goes back in the trailers."""
    rid = call_request_id(dict(context.invocation_metadata() or ()))
    with contextlib.suppress(CnnserveError), recorded(RequestRecord(rid, "grpc", "POST", route)):
        raise error
    await context.abort(error.grpc_code, error.public_message(), ((REQUEST_ID_KEY, rid),))
