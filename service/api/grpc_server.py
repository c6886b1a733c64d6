"""The gRPC server: in the same process and event loop as REST, on its own port.

Started and stopped by the app's lifespan, so each uvicorn worker serves gRPC from the
same data plane, batchers and registry as its REST routes. Servicers live in
:mod:`service.api.grpc_servicers`; this module only assembles and binds them.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.auth import ApiKeys, GrpcApiKeyInterceptor
from service.api.grpc_backlog import CoreBacklog, ListenerIntake
from service.api.grpc_malformed import MalformedRequestInterceptor
from service.api.grpc_metadata_limit import LastCallRelease, MetadataLimitInterceptor, bind_release
from service.api.grpc_servicers import (
    HealthServicer,
    ImageClassifierServicer,
    ModelServicer,
    PredictionServicer,
)
from service.api.listeners import stop_listening
from service.api.tls import CertificateWatch
from service.concurrency import MAX_REFUSAL_WAIT_SECONDS
from service.config import Settings
from service.dataplane import DataPlane
from service.proto_gen import cnnserve_v1_pb2, cnnserve_v1_pb2_grpc
from service.proto_gen.tensorflow_serving.apis import (
    model_service_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
)

log = logging.getLogger(__name__)

# The services health answers for (besides "", the whole server), by full name.
SERVICES = (
    prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    cnnserve_v1_pb2.DESCRIPTOR.services_by_name["ImageClassifier"].full_name,
)


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    limit = settings.grpc_max_message_bytes
    header_ms = math.ceil(settings.header_read_timeout_seconds * 1000)
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # A call's metadata held to what REST's headers may take, and refused above it
        # every time: between gRPC's own soft limit (8 KiB) and its hard one (16 KiB) it
        # refused a share of the calls at random (12 KiB: 2 calls in 5).
        ("grpc.max_metadata_size", settings.max_header_bytes),
        ("grpc.absolute_max_metadata_size", settings.max_header_bytes),
        # Every listener of every worker binds the port (start-up checked it was free)
        # and the kernel spreads connections over them. One listener alone, a port
        # already in use must fail its bind, not be shared.
        ("grpc.so_reuseport", 1 if settings.workers * settings.grpc_listeners > 1 else 0),
        # Let a gateway in front (the tfserving backend) keep its connection alive.
        ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
        # A connection must finish its TLS handshake and send HTTP/2's opening SETTINGS
        # within the header read timeout, as a REST request its headers (gRPC's own
        # defaults: 120 s with TLS, 60 s without, what a silent client held a socket).
        ("grpc.server_handshake_timeout_ms", header_ms),
        *_pings(header_ms),
        # What one connection may hold. grpc.aio takes calls from its core one at a time
        # on the event loop, so a client keeping 128 calls in flight on one connection
        # queued them all ahead of every other client's, where no admission sees them
        # (a polite client's call waited 100-330 ms). With the limit advertised, the
        # client keeps its excess calls itself.
        ("grpc.max_concurrent_streams", settings.grpc_streams_per_connection),
        # Count streams as HTTP/2 does, not until the core frees them: counting the
        # freed-but-not-yet-released ones too, the server reset with REFUSED_STREAM the
        # calls a client sent within the limit it was told (UNAVAILABLE to it, 14% of a
        # spinning client's calls in one run). Without a stream limit (gRPC's default, and
        # ours before) that counting never applied; HTTP/2 rapid reset has its own guards
        # in gRPC's core (pings on RST_STREAM, reads per turn).
        ("grpc.http.overload_protection", 0),
        ("grpc.max_allowed_incoming_connections", connection_cap(settings)),
        *_connection_age(settings),
    ]


def _pings(every_ms: int) -> list[tuple[str, Any]]:
    """A peer must acknowledge the server's SETTINGS within ``every_ms`` (the header
    read timeout; gRPC's default: 60 s), and an idle connection is pinged that often.

    Until the peer acknowledges them, the core does not hold its header block to the
    header list size they advertise: a CONTINUATION flood's entries piled up, ~70 MB a
    connection, for as long as the peer liked (20 held floods of 8 MB each: 107 ->
    1,576 MB). Now such a connection is closed after one header timeout. A peer that
    acknowledged them costs no such memory; inside a header block that never ends it
    can answer no ping (HTTP/2 allows no other frame before the block's end), so the
    keepalive ping, sent once nothing came for ``every_ms``, closes it after gRPC's ping
    timeout (60 s). That timeout is left as it is: it bounds every ping, the core's
    bandwidth probes during an upload too, whose answer waits behind the client's
    queued bytes (at 10 s, uploads of 2 MB at 200 KB/s were cut off: an outside review).
    Every HTTP/2 peer answers pings itself (gRPC's clients, proxies): idle connections
    are kept."""
    return [
        ("grpc.http2.settings_timeout", every_ms),
        ("grpc.keepalive_time_ms", every_ms),
        ("grpc.keepalive_permit_without_calls", 1),  # a header block is no call yet
        ("grpc.http2.max_pings_without_data", 0),
    ]


# A small max_connections over many listeners left each one connection: a client's 20
# connections met 3-4 refusals at random, two of them hashed onto one listener (an
# outside review). With 4, a few connections are held whatever the hash.
MIN_LISTENER_CONNECTIONS = 4


def connection_cap(settings: Settings) -> int:
    """The gRPC connections one listener holds: twice an even share of
    ``max_connections`` (REST's per worker; the kernel hashes connections onto the
    listeners, not evenly), at least :data:`MIN_LISTENER_CONNECTIONS`. gRPC's core closes
    one past it as it comes (the client sees UNAVAILABLE and reconnects, most often onto
    another listener). Unbounded before: a peer held every connection it opened until
    the connection age (5 min), ~17 KB each and a file descriptor, which REST's accepts
    need too."""
    even = math.ceil(2 * settings.max_connections / settings.grpc_listeners)
    return max(even, MIN_LISTENER_CONNECTIONS)


def _connection_age(settings: Settings) -> list[tuple[str, Any]]:
    """A peer that never opens its HTTP/2 flow-control window, or stops reading, holds
    its answered calls (gRPC's core counts them in progress until sent): 220 connections
    x 32 such calls refused most other clients' calls, health checks included, for as
    long as they stayed. The connection's age bounds that, and the grace (REST's send
    timeout) is what a call still in progress then gets to finish. (Keepalive pings do
    not: the server sent none to a peer holding an unacknowledged ping, grpcio 1.85.)"""
    age = settings.grpc_max_connection_age_seconds
    if not age:
        return []
    return [
        ("grpc.max_connection_age_ms", math.ceil(age * 1000)),
        ("grpc.max_connection_age_grace_ms", math.ceil(settings.send_timeout_seconds * 1000)),
    ]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def call_cap(settings: Settings) -> int:
    """gRPC's cap on calls in progress in a worker: the calls admission admits, the
    refused ones waiting their turn at the refusal pace (MAX_REFUSAL_WAIT_SECONDS of
    it; at least as many as admitted) and the health Watches. Twice the limit, as it
    was, let gRPC's core refuse most refusals itself when the limit was set low (a limit
    of 2: 222 of 231 RESOURCE_EXHAUSTED in no metric). More calls than this spinning on
    one worker (each waits up to the 2 s cap, however many) still meet the core's
    refusal, uncounted: a client fleet of that size needs more workers or replicas."""
    admitted = settings.max_concurrent_requests
    waiting = math.ceil(settings.max_refusals_per_second * MAX_REFUSAL_WAIT_SECONDS)
    return admitted + max(admitted, waiting) + settings.max_health_watches


def listener_cap(settings: Settings) -> int:
    """One listener's share of :func:`call_cap`, twice an even share: the kernel spreads
    connections over the listeners unevenly (by a hash), and a listener whose share ran
    out would refuse in the core while the worker had room. At least room for all the
    worker's health Watches beside a full connection (many listeners: each share small)."""
    cap = call_cap(settings)
    floor = settings.max_health_watches + settings.grpc_streams_per_connection
    return min(cap, max(math.ceil(2 * cap / settings.grpc_listeners), floor))


async def start_grpc(
    settings: Settings,
    plane: DataPlane,
    keys: ApiKeys | None = None,
    tls: CertificateWatch | None = None,
) -> list[Any] | None:
    """Bind and start the worker's gRPC listeners; None when ``grpc_port`` is 0
    (disabled). With API keys, calls other than health need one; with ``tls`` (the
    certificate followed), the port speaks TLS.

    ``grpc_listeners`` servers share the port (SO_REUSEPORT), each with the connections
    the kernel gives it. grpc.aio takes a server's calls from its core one at a time, one
    per turn of the event loop: on a busy loop calls over many connections queued there
    ahead of every other client's, where admission could neither see nor refuse them
    (one server, 8 connections x 16 calls: a polite client's p99 ~220 ms, its refusals
    ~45 ms; 16 listeners: ~90 ms and ~6 ms; medians of `cnnserve bench --overload
    --protocol grpc` runs). A call now waits behind its own listener's connections only.

    Admission is the worker's concurrency limit (service.concurrency), shared with REST.
    gRPC's own cap on calls in progress is only a backstop on what calls hold: it counts
    health checks and refused calls waiting for their turn too, and refuses beyond it in
    its core (RESOURCE_EXHAUSTED, a health check included), where cnnserve neither sees
    nor counts them: :func:`call_cap` leaves room for what admission holds at its pace."""
    if not settings.grpc_port:
        return None

    def interceptors(release: LastCallRelease | None, intake: ListenerIntake) -> list[Any]:
        # A listener's own: the malformed-request interceptor keeps the handlers it
        # wrapped, and each server has handlers of its own.
        chain: list[Any] = [MetadataLimitInterceptor(settings.max_header_bytes, release, intake)]
        if keys is not None and keys.enabled:
            chain.append(GrpcApiKeyInterceptor(keys))
        chain.append(  # last: inside authentication
            MalformedRequestInterceptor(
                settings.body_read_timeout_seconds,
                stopping=plane.stopping,
                crowd=listener_cap(settings) // 2,
            )
        )
        return chain

    # Created once, shared by the listeners: health Watches and everything else are
    # counted per worker, not per listener.
    servicers: Servicers = (
        (
            prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server,
            PredictionServicer(plane),
        ),
        (model_service_pb2_grpc.add_ModelServiceServicer_to_server, ModelServicer(plane)),
        (
            cnnserve_v1_pb2_grpc.add_ImageClassifierServicer_to_server,
            ImageClassifierServicer(plane),
        ),
        (health_pb2_grpc.add_HealthServicer_to_server, HealthServicer(plane, SERVICES)),
    )
    address = _address(settings.host, settings.grpc_port)
    servers: list[Any] = []
    backlog = CoreBacklog()
    try:
        for _ in range(settings.grpc_listeners):
            release = LastCallRelease.private()
            intake = ListenerIntake(plane.concurrency)
            server = _listener(settings, interceptors(release, intake), servicers, address, tls)
            backlog.register(intake)
            bind_release(server, release)
            await server.start()
            servers.append(server)
    except BaseException:
        # None left listening: a bound listener nobody serves would be given a share of
        # the port's new connections.
        await asyncio.gather(*(server.stop(None) for server in servers))
        raise
    backlog.start(plane.concurrency, lambda: plane.closing_calls)
    log.info("gRPC listening on %s%s", address, " (TLS)" if tls is not None else "")
    return servers


# Each servicer with the generated function that adds it to a server.
Servicers = tuple[tuple[Callable[[Any, Any], None], Any], ...]


def _listener(
    settings: Settings,
    interceptors: list[Any],
    servicers: Servicers,
    address: str,
    tls: CertificateWatch | None,
) -> Any:
    """One gRPC server on ``address``, serving the worker's ``servicers``."""
    server = grpc.aio.server(
        options=server_options(settings),
        interceptors=interceptors,
        maximum_concurrent_rpcs=listener_cap(settings),
    )
    for add_to_server, servicer in servicers:
        add_to_server(servicer, server)
    reflection.enable_server_reflection(
        [*SERVICES, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        if tls is not None:
            bound = server.add_secure_port(address, tls.grpc_credentials())
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        bound = 0
        log.error("cannot bind gRPC to %s: %s", address, exc)
    if not bound:
        raise RuntimeError(f"gRPC cannot listen on {address}; is the port in use?")
    return server


async def stop_grpc(
    servers: list[Any] | None,
    grace_seconds: float = 5.0,
    plane: DataPlane | None = None,
    port: int = 0,
) -> None:
    """Stop taking calls and give running ones ``grace_seconds`` to finish.

    gRPC's stop sends GOAWAY: clients send their next calls on a new connection (to the
    worker's successor in a rolling restart, to another replica behind a balancer). A
    call its core took in but had not handed to a handler yet is answered CANCELLED
    (grpc/grpc#41785), which the retry policy of docs/grpc-service-config.json retries.
    No refusal window comes first: our handlers refused new calls UNAVAILABLE "shutting
    down; retry on another replica" for 0.5 s before the stop, but a client's next call
    came on the same connection, to the same worker, until the GOAWAY. Behind a proxy
    with two replicas, 8 callers on one connection lost 1,093-1,174 calls a SIGTERM that
    way, with the retry policy or without; now none with it, and 3-5 (CANCELLED)
    without."""
    if servers is None:
        return
    if plane is not None:
        plane.closing_calls = True
    if port:
        # All of them before any stop's GOAWAY sends clients reconnecting: one landing
        # on a listener of this worker not yet closed was reset (service.api.listeners).
        stop_listening(port)
    await asyncio.gather(*(server.stop(grace_seconds) for server in servers))
