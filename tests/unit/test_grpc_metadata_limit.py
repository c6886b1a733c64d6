"""A call over the metadata limit is refused first, and its listener is made to let go
of it: a real grpc.aio server, a real client, the listener's private socket."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.grpc_metadata_limit import (
    LastCallRelease,
    MetadataLimitInterceptor,
    bind_release,
    metadata_bytes,
    oversize,
)
from service.launch import free_port

LIMIT = 4096


def test_metadata_is_counted_as_http2_counts_a_header_list() -> None:
    assert oversize((("a", "b" * (LIMIT - 33)),), LIMIT) is None  # 1 + 4062 + 32 = LIMIT
    refusal = oversize((("a", "b" * (LIMIT - 32)),), LIMIT)
    assert refusal is not None and refusal.code == "headers_too_large"
    assert f"is {LIMIT + 1} bytes, over CNNSERVE_MAX_HEADER_BYTES ({LIMIT})" in str(refusal)


def test_a_binary_value_counts_as_its_base64() -> None:
    """gRPC hands ``-bin`` values on decoded; HTTP/2 counted them in base64."""
    assert metadata_bytes((("x-bin", b"\0" * 3000),)) == 5 + 4000 + 32
    assert oversize((("x-bin", b"\0" * 3000),), LIMIT) is None
    assert oversize((("x-bin", b"\0" * 3100),), LIMIT) is not None  # 4,136 + 37 bytes


def test_a_flood_of_entries_is_refused_by_their_count() -> None:
    """Hundreds of thousands of entries (what gRPC's core hands on from a CONTINUATION
    flood) are over by their count: each counts at least 32 bytes."""
    entries = (("x-a", "b"),) * 200_000
    refusal = oversize(entries, LIMIT)
    assert refusal is not None
    assert "has 200000 entries, at least 6400000 bytes" in str(refusal)


class CountingHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Health Check that counts its calls, each held until ``go`` is set."""

    def __init__(self) -> None:
        self.checks = 0
        self.go = asyncio.Event()
        self.go.set()

    async def Check(self, request: Any, context: Any) -> Any:
        self.checks += 1
        await self.go.wait()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@asynccontextmanager
async def listener(
    health: CountingHealth, release: LastCallRelease | None
) -> AsyncIterator[grpc.aio.Channel]:
    """A listener refusing over LIMIT and releasing through ``release``; a channel to it."""
    server = grpc.aio.server(interceptors=[MetadataLimitInterceptor(LIMIT, release)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    bind_release(server, release)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def check(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> Any:
    stub = health_pb2_grpc.HealthStub(channel)
    return await stub.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=10)


async def until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def test_a_call_over_the_limit_is_refused_and_its_listener_sent_a_call_of_its_own() -> None:
    async def main() -> None:
        health = CountingHealth()
        release = LastCallRelease.private()
        assert release is not None
        async with listener(health, release) as channel:
            assert (await check(channel, (("x-small", "a"),))).status == 1
            assert health.checks == 1
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await check(channel, (("x-big", "a" * LIMIT),))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "over CNNSERVE_MAX_HEADER_BYTES (4096)" in str(refused.value.details())
            # The refused call never reached the servicer; the release's Check did,
            # over the listener's private socket.
            await asyncio.wait_for(until(lambda: health.checks == 2), 10)

    asyncio.run(main())


def test_refusals_while_a_release_is_on_its_way_send_one_more_not_one_each() -> None:
    """A flood over several connections of one listener: its last call is the last to
    arrive, so one more Check after the one on its way lets it go."""

    async def main() -> None:
        health = CountingHealth()
        release = LastCallRelease.private()
        assert release is not None
        async with listener(health, release) as channel:
            health.go.clear()  # the first release's Check is held
            for _ in range(5):
                with pytest.raises(grpc.aio.AioRpcError):
                    await check(channel, (("x-big", "a" * LIMIT),))
            await asyncio.wait_for(until(lambda: health.checks == 1), 10)
            health.go.set()
            await asyncio.wait_for(until(lambda: not release.sending), 10)
            assert health.checks == 2

    asyncio.run(main())


def test_a_private_socket_that_cannot_be_bound_leaves_calls_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The address taken (by another server here): a warning, and the call still refused."""

    async def main() -> None:
        taken = LastCallRelease.private()
        assert taken is not None
        holder = grpc.aio.server()
        assert holder.add_insecure_port(str(taken.address))
        await holder.start()
        try:
            release = LastCallRelease(str(taken.address))
            health = CountingHealth()
            with caplog.at_level(logging.WARNING, "service.api.grpc_metadata_limit"):
                async with listener(health, release) as channel:
                    assert release.address is None
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await check(channel, (("x-big", "a" * LIMIT),))
                    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert health.checks == 0
            assert "keep the last call over the metadata limit" in caplog.text
        finally:
            await holder.stop(None)

    asyncio.run(main())
