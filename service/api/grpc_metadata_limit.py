"""gRPC calls whose metadata is over CNNSERVE_MAX_HEADER_BYTES: refused before anything
else looks at them, and what their listener keeps of them let go at once.

gRPC's core holds a call's metadata to the limit only when its header block comes in
one HEADERS frame. Split over CONTINUATION frames (a CONTINUATION flood: one header
block that never ends) by a peer that has not acknowledged the server's SETTINGS, it
passes the call on, when the connection ends, with hundreds of thousands of entries
(372,820 of 14 bytes once ~6 MB had come, ~36 MB as the C array grpc.aio is handed;
such a peer is closed after the header timeout now: grpc_server._pings).
And grpc.aio keeps each listener's last call until that listener's next call arrives:
its accept loop holds the call in a local while it waits. So every listener kept the
last flood it saw: a worker of 64 listeners grew ~35 MB with each flooded connection
(107 -> 881 MB over 20) and kept it for as long as no other call came (one ordinary call
on each listener gave all of it back: 643 -> 164 MB).

Now each listener also listens on a private socket of its own, and after refusing such a
call its interceptor sends a health Check there: the listener's next call, which lets
the flood's go."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.grpc_backlog import ListenerIntake
from service.api.grpc_calls import refusal_handler
from service.errors import HeadersTooLarge

log = logging.getLogger(__name__)

# HTTP/2 counts 32 bytes a field besides its name and value (RFC 7540 6.5.2).
FIELD_OVERHEAD = 32
# How long the Check to a listener's private socket may take (it is answered from memory).
RELEASE_TIMEOUT_SECONDS = 5.0


def metadata_bytes(metadata: Iterable[tuple[str, Any]]) -> int:
    """A call's metadata as HTTP/2 counts a header list: name, value and 32 a field. A
    ``-bin`` value is counted as sent, in base64 (gRPC hands it on decoded: 80,000 bytes
    on the wire passed as 60,000)."""
    return sum(
        len(name)
        + (-(-len(value) // 3) * 4 if name.endswith("-bin") else len(value))
        + FIELD_OVERHEAD
        for name, value in metadata
    )


def oversize(metadata: tuple[tuple[str, Any], ...], limit: int) -> HeadersTooLarge | None:
    """HeadersTooLarge when the metadata is over ``limit``, else None. A flood's hundreds
    of thousands of entries are known to be over by their count alone (each counts at
    least 32 bytes): not summed on the event loop."""
    if len(metadata) * FIELD_OVERHEAD > limit:
        said = f"has {len(metadata)} entries, at least {len(metadata) * FIELD_OVERHEAD} bytes"
    elif (size := metadata_bytes(metadata)) > limit:
        said = f"is {size} bytes"
    else:
        return None
    return HeadersTooLarge(
        f"the call's metadata {said}, over CNNSERVE_MAX_HEADER_BYTES ({limit}); send less"
    )


class LastCallRelease:
    """A listener's private address (an abstract Unix socket: nothing on disk, gone with
    the process), and the health Check that makes it let go of its last call."""

    def __init__(self, address: str) -> None:
        self.address: str | None = address
        self._task: asyncio.Task[None] | None = None
        self._again = False

    @classmethod
    def private(cls) -> LastCallRelease | None:
        """A fresh release for one listener; None where abstract sockets do not exist
        (off Linux: there the last call is kept until the listener's next one)."""
        if not sys.platform.startswith("linux"):
            return None
        return cls(f"unix-abstract:cnnserve-{os.getpid()}-{secrets.token_hex(8)}")

    @property
    def sending(self) -> bool:
        """Whether a Check is on its way (or one more is due after it)."""
        return self._task is not None and not self._task.done()

    def soon(self) -> None:
        """Send the Check, or once more after the one on its way (a flood on several
        connections of one listener: its last call is the last to arrive)."""
        if self.address is None:
            return
        if self.sending:
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(
            self._send(self.address), name="grpc-listener-release"
        )

    async def _send(self, address: str) -> None:
        # A channel of its own each time: floods are rare, and nothing is left open.
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._again = False
                try:
                    await stub.Check(
                        health_pb2.HealthCheckRequest(), timeout=RELEASE_TIMEOUT_SECONDS
                    )
                except grpc.RpcError as exc:  # the server stopping: nothing to let go of
                    log.debug("releasing a gRPC listener's last call: %s", exc.code())
                if not self._again:
                    return


class MetadataLimitInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """First in every listener's chain: counts the calls it takes (``intake``), and a
    call whose metadata is over ``limit`` is refused (RESOURCE_EXHAUSTED
    ``headers_too_large``, counted and logged as REST's 431), before its API key is
    looked at or its message read, and ``release`` is asked to let it go."""

    def __init__(
        self, limit: int, release: LastCallRelease | None, intake: ListenerIntake | None = None
    ) -> None:
        self._limit = limit
        self._release = release
        self._intake = intake

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        if self._intake is not None:  # first in the chain: every call the listener takes
            self._intake.take()
        handler = await continuation(details)
        refusal = oversize(tuple(details.invocation_metadata or ()), self._limit)
        if refusal is None:
            return handler
        if self._release is not None:
            self._release.soon()
        if handler is None:  # no such method: gRPC's own UNIMPLEMENTED
            return None
        return refusal_handler(handler, refusal, str(details.method))


def bind_release(server: Any, release: LastCallRelease | None) -> None:
    """Listen on ``release``'s private address too; where that fails, calls are still
    refused, but their listener keeps the last until its next."""
    if release is None or release.address is None:
        return
    bound = 0
    with contextlib.suppress(RuntimeError):
        bound = server.add_insecure_port(release.address)
    if not bound:
        log.warning(
            "gRPC: cannot listen on %s; a listener will keep the last call over the "
            "metadata limit until its next call",
            release.address,
        )
        release.address = None
