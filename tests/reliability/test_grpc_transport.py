"""A gRPC peer that holds its answers: it never opens its HTTP/2 flow-control window
(answering pings all the while). gRPC's core counts such calls in progress until their
answers are sent, so each held one of the worker's places for calls in progress for
good: its connection is closed now, its calls with it."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers.h2raw import DATA, GOAWAY, HEADERS, RawGrpc
from tests.helpers.server import running_server

pytestmark = pytest.mark.reliability

CHECK = "/grpc.health.v1.Health/Check"
CALLS = 8
SECONDS = 1  # the connection age and the send timeout (its grace, and the ping's wait)
MARGIN = 15.0  # what a loaded machine may add before the close is seen


def serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def test_a_peer_that_never_opens_its_window_is_closed_after_the_connection_age(
    tiny_repo_litert: Path,
) -> None:
    env = {
        "CNNSERVE_GRPC_MAX_CONNECTION_AGE_SECONDS": str(SECONDS),
        "CNNSERVE_SEND_TIMEOUT_SECONDS": str(SECONDS),
        "CNNSERVE_POLL_SECONDS": "0",
    }
    with running_server(tiny_repo_litert, grpc_port=0, env=env) as server:
        peer = RawGrpc(server.grpc_port, window=0)
        try:
            started = time.monotonic()
            for _ in range(CALLS):
                peer.call(CHECK)
            kinds: list[int] = []
            until = started + 2 * SECONDS + MARGIN
            while (got := peer.read(until)) is not None:  # TimeoutError: held for good
                peer.answer(got, pings=True)
                kinds.append(got.type)
            closed_after = time.monotonic() - started
        finally:
            peer.close()
        assert GOAWAY in kinds, kinds  # asked to go first, then closed
        # Answered (headers), but no answer's message could be sent: the window stayed 0.
        assert HEADERS in kinds and DATA not in kinds, kinds
        assert closed_after >= SECONDS
        assert serving(server.grpc_target)
