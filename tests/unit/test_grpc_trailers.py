"""A refused gRPC call's answer: trailers alone (headers would commit the call, and
gRPC's own retries would never retry it), with its request id, the retry-after REST's
Retry-After carries, and for RESOURCE_EXHAUSTED what gRPC's retries read of when to come
back (grpc-retry-pushback-ms): an overload's after its retry-after, a call too large
never."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from service.api.grpc_calls import PUSHBACK_KEY, REQUEST_ID_KEY, error_trailers
from service.errors import (
    ApiKeysUnavailable,
    CnnserveError,
    HeadersTooLarge,
    InvalidRequest,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
)
from tests.helpers.predict_servicer import RefusingPlane, predict_request, predict_stub


@pytest.mark.parametrize(
    ("error", "retry_after", "pushback"),
    [
        (Overloaded("busy"), "1", "1000"),
        (Overloaded("too many connections", reason="connections", move=True), "1", "1000"),
        (PayloadTooLarge("too large"), None, "-1"),
        (HeadersTooLarge("metadata too large"), None, "-1"),
        # UNAVAILABLE: retried at once on another connection or replica, as the
        # documented policy does; an unchecked key's 10 s would outlast most deadlines.
        (ModelNotReady("loading"), "1", None),
        (ApiKeysUnavailable("no key file read"), "10", None),
        (InvalidRequest("bad"), None, None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, CnnserveError) else repr(v),
)
def test_trailers_say_when_to_retry(
    error: CnnserveError, retry_after: str | None, pushback: str | None
) -> None:
    trailers = error_trailers("rid-1", error)
    keys = [key for key, _ in trailers]
    assert len(keys) == len(set(keys)), trailers
    found = dict(trailers)
    assert found[REQUEST_ID_KEY] == "rid-1"
    assert found.get("retry-after") == retry_after
    assert found.get(PUSHBACK_KEY) == pushback


def test_the_documented_retry_policy_retries_a_model_not_ready_yet() -> None:
    """docs/grpc-service-config.json retries UNAVAILABLE up to 4 attempts: each reaches
    the servicer (answered as headers, an empty message and trailers, only the first
    did)."""
    config = (Path(__file__).parents[2] / "docs" / "grpc-service-config.json").read_text()
    plane = RefusingPlane(lambda: ModelNotReady("version 1 of m is loading"))

    async def call() -> grpc.StatusCode:
        async with predict_stub(plane, [("grpc.service_config", config)]) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Predict(predict_request(1), timeout=30)
            return refused.value.code()

    assert asyncio.run(call()) == grpc.StatusCode.UNAVAILABLE
    assert plane.calls == 4
