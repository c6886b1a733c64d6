"""A TCP proxy on 127.0.0.1 that hands each connection to the next of its backends in
turn, as an L4 balancer does (a Kubernetes Service's kube-proxy, a cloud TCP balancer):
a client's connection stays with one backend, whatever its calls."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@contextmanager
def tcp_proxy(backends: list[int]) -> Iterator[int]:
    """Proxy to the ``backends`` (ports on 127.0.0.1), the first connection to the
    first; yields the proxy's port. A connection whose backend refuses it is closed."""
    turns = itertools.cycle(backends)
    started = threading.Event()
    port: list[int] = []
    stopping: list[asyncio.Event] = []

    piping: set[asyncio.Task[None] | None] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        piping.add(task)
        try:
            to_reader, to_writer = await asyncio.open_connection("127.0.0.1", next(turns))
            await asyncio.gather(_pipe(reader, to_writer), _pipe(to_reader, writer))
        except OSError:
            writer.close()
        finally:
            piping.discard(task)

    async def main() -> None:
        stop = asyncio.Event()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        stopping.append(stop)
        started.set()
        async with server:
            await stop.wait()
        # Connections still open end with the proxy, inside its loop.
        pending = [task for task in piping if task is not None]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10), "the proxy did not start"
    try:
        yield port[0]
    finally:
        loop.call_soon_threadsafe(stopping[0].set)
        thread.join(10)
        with suppress(RuntimeError):
            loop.close()
