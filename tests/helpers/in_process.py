"""The real app and uvicorn with the gateway's HTTP protocol, in this process on a thread:
for tests that look inside the worker (a spy on a method, its concurrency count) while a
raw socket sends what httpx would not."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from service.api.app import create_app
from service.api.http_protocol import GatewayHttpProtocol
from service.config import Settings
from service.launch import free_port


@contextmanager
def serving_in_process(settings: Settings) -> Iterator[int]:
    """Serve ``settings``' app on a free port until the block ends; its port, once ready."""
    with server_in_process(settings) as (port, _):
        yield port


@contextmanager
def server_in_process(settings: Settings) -> Iterator[tuple[int, uvicorn.Server]]:
    """:func:`serving_in_process`, with the uvicorn server too (its ``should_exit`` stops
    it as a signal would)."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        http=GatewayHttpProtocol,
        log_level="warning",
        access_log=False,
    )
    runner = uvicorn.Server(config)
    runner.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=lambda: asyncio.run(runner.serve()), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the in-process server did not get ready"
            time.sleep(0.05)
        yield port, runner
    finally:
        runner.should_exit = True
        thread.join(timeout=30)


def connect(port: int) -> socket.socket:
    """A raw connection to the in-process server, each write sent at once."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
