"""stop_listening takes this process's listeners on a port out of the port's group at
once and touches nothing else: real sockets, a sibling process sharing the port, a real
grpc.aio server."""

from __future__ import annotations

import asyncio
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.api.listeners import stop_listening
from service.launch import free_port

# A sibling process on the same port (SO_REUSEPORT): it says "ready", then answers each
# connection it accepts with "sibling".
SIBLING = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"sibling")
    c.close()
"""


def listener(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    return sock


def listens(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


@contextmanager
def sibling(port: int) -> Iterator[None]:
    process = subprocess.Popen(
        [sys.executable, "-c", SIBLING, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        yield
    finally:
        process.kill()
        process.wait()


def test_only_the_listeners_on_the_port_are_closed() -> None:
    port = free_port()
    with listener(port) as first, listener(port) as second, listener() as elsewhere:
        client = socket.create_connection(("127.0.0.1", port))
        ready, _, _ = select.select([first, second], [], [], 10)
        accepted, _ = ready[0].accept()
        assert stop_listening(port) == 2
        assert not listens(first) and not listens(second)  # their numbers: stand-ins now
        assert listens(elsewhere)
        with client, accepted:  # a connection on the port is not a listener: untouched
            client.sendall(b"still here")
            assert accepted.recv(64) == b"still here"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            pass  # nothing listens on the port any more
        else:
            raise AssertionError("a connection was taken on a closed port")
        assert stop_listening(port) == 0


def test_new_connections_go_to_the_port_s_other_listeners() -> None:
    """Closed while a sibling shares the port, the listener no longer takes a share of
    new connections (the kernel hashed some onto it, and reset them at its close): every
    one reaches the sibling."""
    port = free_port()
    with listener(port) as ours, sibling(port):
        assert stop_listening(port) == 1
        for _ in range(40):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                assert client.recv(16) == b"sibling"
        assert not listens(ours)


def test_a_grpc_server_keeps_its_connections_and_stops_quietly(capfd: object) -> None:
    """gRPC's core keeps serving the connections it has, closes the stand-in at its stop
    as it would have closed its listener, and logs nothing about it (shut down in place,
    its poller woke and logged "Failed accept4" at ERROR)."""

    async def main() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest()
                await stub.Check(request, timeout=10)
                assert stop_listening(port) == 1
                for _ in range(3):  # its connection is served still
                    assert (await stub.Check(request, timeout=10)).status == 1
                # Its own subchannels: not the first channel's connection, shared.
                own = [("grpc.use_local_subchannel_pool", 1)]
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=own) as fresh:
                    try:
                        await health_pb2_grpc.HealthStub(fresh).Check(request, timeout=5)
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    else:
                        raise AssertionError("a new connection was taken")
        finally:
            await asyncio.wait_for(server.stop(1), timeout=30)

    asyncio.run(main())
    _, err = capfd.readouterr()  # type: ignore[attr-defined]
    assert "accept" not in err.lower(), err
