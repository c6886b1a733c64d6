"""The gRPC server's options that bound what one connection holds."""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from pydantic import ValidationError

from service.api import grpc_server
from service.api.grpc_server import call_cap, connection_cap, listener_cap, server_options
from service.concurrency import MAX_REFUSAL_WAIT_SECONDS
from service.config import Settings
from service.dataplane import DataPlane
from service.launch import free_port


def streams(**settings: object) -> int:
    options = dict(server_options(Settings(**settings)))  # type: ignore[arg-type]
    # Counted as HTTP/2 counts them: gRPC's own counting reset calls within the limit.
    assert options["grpc.http.overload_protection"] == 0
    return int(options["grpc.max_concurrent_streams"])


def test_a_connection_holds_what_the_worker_infers_at_once_by_default() -> None:
    assert streams() == 32  # a batch
    assert streams(max_batch_size=1, num_batch_threads=64) == 64
    assert streams(max_batch_size=1) == 8  # room beside a health Watch
    assert streams(grpc_max_concurrent_streams=2) == 2


def test_one_stream_is_refused_for_the_watch_beside_it() -> None:
    with pytest.raises(ValidationError, match="health Watch"):
        Settings(grpc_max_concurrent_streams=1)


@pytest.mark.parametrize(
    "settings",
    [
        Settings(),
        Settings(max_concurrent_requests=2),
        Settings(max_concurrent_requests=2, max_refusals_per_second=0),
    ],
)
def test_grpcs_own_cap_is_above_what_admission_holds_at_its_pace(settings: Settings) -> None:
    """Calls admitted, refusals waiting their turn (at most MAX_REFUSAL_WAIT_SECONDS of
    the pace) and health Watches all fit below gRPC's core cap, so its uncounted
    RESOURCE_EXHAUSTED is only a backstop (at twice a limit of 2, it answered most)."""
    waiting = settings.max_refusals_per_second * MAX_REFUSAL_WAIT_SECONDS
    cap = call_cap(settings)
    assert cap >= settings.max_concurrent_requests + waiting + settings.max_health_watches
    assert cap >= 2 * settings.max_concurrent_requests + settings.max_health_watches


@pytest.mark.parametrize("listeners", [1, 2, 3, 16, 64])
def test_each_listener_holds_twice_an_even_share_of_the_cap(listeners: int) -> None:
    """The worker's listeners share its cap, each twice an even share (the kernel spreads
    connections by a hash, not evenly), never more than the whole."""
    settings = Settings(grpc_listeners=listeners)
    cap, share = call_cap(settings), listener_cap(settings)
    assert share <= cap
    assert listeners * share >= min(2, listeners) * cap
    assert share == cap or share < cap * 2 / listeners + 1 or listeners == 64
    # However many listeners: one holds every health Watch of the worker and a full
    # connection beside them (64 listeners' even share, 51, is below the 100 Watches).
    assert share >= settings.max_health_watches + settings.grpc_streams_per_connection


@pytest.mark.parametrize(
    ("workers", "listeners", "shared"), [(1, 1, 0), (1, 16, 1), (2, 1, 1), (4, 16, 1)]
)
def test_the_port_is_shared_only_by_several_listeners(
    workers: int, listeners: int, shared: int
) -> None:
    """One listener alone must fail its bind on a port in use, not share it."""
    options = dict(server_options(Settings(workers=workers, grpc_listeners=listeners)))
    assert options["grpc.so_reuseport"] == shared


def test_connections_are_closed_at_their_age_after_the_send_timeout() -> None:
    options = dict(
        server_options(Settings(grpc_max_connection_age_seconds=60, send_timeout_seconds=5))
    )
    assert options["grpc.max_connection_age_ms"] == 60_000
    assert options["grpc.max_connection_age_grace_ms"] == 5_000
    never = dict(server_options(Settings(grpc_max_connection_age_seconds=0)))
    assert "grpc.max_connection_age_ms" not in never


def test_a_listener_that_fails_to_start_leaves_none_listening(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Start-up fails whole: the listeners started before the one that failed stop (a
    bound listener nobody serves would be given a share of the port's connections)."""
    port = free_port()
    settings = Settings(grpc_port=port, grpc_listeners=4)
    made: list[Any] = []
    original = grpc_server._listener

    def third_fails(*args: Any) -> Any:
        if len(made) == 2:
            raise RuntimeError("gRPC cannot listen")
        made.append(original(*args))
        return made[-1]

    monkeypatch.setattr(grpc_server, "_listener", third_fails)

    async def start() -> None:
        with ThreadPoolExecutor(1) as pool:
            plane = DataPlane(settings, None, pool)  # type: ignore[arg-type]
            with pytest.raises(RuntimeError, match="cannot listen"):
                await grpc_server.start_grpc(settings, plane)

    asyncio.run(start())
    assert len(made) == 2
    with socket.socket() as probe:  # nothing listens there any more
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    ("connections", "listeners", "each"),
    [(2048, 64, 64), (4, 1, 8), (5, 2, 5), (32, 64, 4), (1, 64, 4), (1, 1, 4)],
)
def test_each_listener_holds_twice_an_even_share_of_the_connections(
    connections: int, listeners: int, each: int
) -> None:
    """gRPC connections are held to CNNSERVE_MAX_CONNECTIONS as REST's are, spread over
    the listeners as the kernel spreads them (by a hash: twice an even share each, at
    least 4: one each refused a client's few connections at random)."""
    settings = Settings(max_connections=connections, grpc_listeners=listeners)
    assert connection_cap(settings) == each
    assert dict(server_options(settings))["grpc.max_allowed_incoming_connections"] == each


def test_settings_are_acknowledged_and_idle_connections_pinged_in_a_header_timeout() -> None:
    """A peer stuck inside a header block cannot answer a ping (HTTP/2), nor acknowledge
    SETTINGS. The ping timeout stays gRPC's own (60 s): it bounds the core's bandwidth
    probes during an upload too, which wait behind the client's queued bytes."""
    options = dict(server_options(Settings(header_read_timeout_seconds=2.5)))
    for name in (
        "grpc.server_handshake_timeout_ms",
        "grpc.http2.settings_timeout",
        "grpc.keepalive_time_ms",
    ):
        assert options[name] == 2500, name
    assert "grpc.http2.ping_timeout_ms" not in options
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_pings_without_data"] == 0
