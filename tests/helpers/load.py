"""Small HTTP/1.1 load generators on raw asyncio streams (127.0.0.1 only), closed-loop
and open-loop: cheap per request, so on a 2-core machine the server, not the client, is
what saturates."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class Outcome:
    status: int
    seconds: float
    retry_after: str | None = None
    sent: float = 0.0  # seconds from the start of its run (open_loop)


@dataclass
class Run:
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)

    def of(self, status: int) -> list[float]:
        return sorted(o.seconds for o in self.outcomes if o.status == status)

    def rate(self, status: int = 200) -> float:
        return len(self.of(status)) / self.seconds

    def statuses(self) -> set[int]:
        return {o.status for o in self.outcomes}


def quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def post(path: str, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


async def _one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, dict[str, str]]:
    writer.write(request)
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: bytes,
    run: Run,
    began: float,
    sent: float = 0.0,
) -> bool:
    """Send ``request`` and read its answer, its outcome added to ``run`` (timed from
    ``began``; status 0 when the connection broke): whether the connection stays open."""
    try:
        status, headers = await _one(reader, writer, request)
    except (ConnectionError, asyncio.IncompleteReadError):
        writer.close()
        run.outcomes.append(Outcome(0, time.perf_counter() - began, sent=sent))
        return False
    run.outcomes.append(
        Outcome(status, time.perf_counter() - began, headers.get("retry-after"), sent)
    )
    if headers.get("connection", "").lower() == "close":
        writer.close()
        return False
    return True


async def _client(port: int, request: bytes, until: float, run: Run) -> None:
    reader = writer = None
    while time.monotonic() < until:
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert reader is not None
        if not await _exchange(reader, writer, request, run, time.perf_counter()):
            writer = None
    if writer is not None:
        writer.close()


async def drive(port: int, request: bytes, connections: int, seconds: float) -> Run:
    """``connections`` clients, each sending ``request`` again as soon as it is answered."""
    run = Run(seconds)
    until = time.monotonic() + seconds
    await asyncio.gather(*(_client(port, request, until, run) for _ in range(connections)))
    return run


def load(port: int, request: bytes, connections: int, seconds: float) -> Run:
    return asyncio.run(drive(port, request, connections, seconds))


@dataclass
class OpenRun(Run):
    opened: int = 0  # connections opened


def open_loop(port: int, request: bytes, rate: float, seconds: float) -> OpenRun:
    """``request`` sent ``rate`` times a second for ``seconds`` whatever the answers take
    (an open loop: k6's arrival-rate executors, vegeta), each on an idle keep-alive
    connection if there is one, else on a new one."""

    async def drive_open() -> OpenRun:
        run = OpenRun(seconds)
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        start = time.perf_counter()

        async def one() -> None:
            began = time.perf_counter()
            if idle:
                reader, writer = idle.pop()
            else:
                run.opened += 1
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if await _exchange(reader, writer, request, run, began, began - start):
                idle.append((reader, writer))

        tasks = []
        for n in range(round(rate * seconds)):
            ahead = start + n / rate - time.perf_counter()
            if ahead > 0:
                await asyncio.sleep(ahead)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        for _, writer in idle:
            writer.close()
        return run

    return asyncio.run(drive_open())


async def _once(port: int, request: bytes, runs: list[Run], host: str | None = None) -> None:
    local = None if host is None else (host, 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local)
    try:
        for run in runs:
            began = time.perf_counter()
            status, headers = await _one(reader, writer, request)
            run.outcomes.append(
                Outcome(status, time.perf_counter() - began, headers.get("retry-after"))
            )
    finally:
        writer.close()


def burst(port: int, request: bytes, connections: int, hosts: bool = False) -> Run:
    """``connections`` clients sending ``request`` once each, all at the same moment."""
    return bursts(port, request, connections, 1, hosts)[0]


def bursts(
    port: int, request: bytes, connections: int, times: int, hosts: bool = False
) -> list[Run]:
    """``connections`` clients, all at the same moment, each sending ``request``
    ``times`` times on its connection, again as soon as it is answered (retrying at
    once): one Run per round. ``hosts``: each client from a host of its own (a loopback
    address, 127.0.0.2 on), as distinct clients are; else all from 127.0.0.1, as one
    client's connections are (the server judges a new connection by its host's
    refusals: service.concurrency.ConnectionRefusals)."""

    async def drive_rounds() -> list[Run]:
        runs = [Run(0.0) for _ in range(times)]
        await asyncio.gather(
            *(
                _once(port, request, runs, loopback_host(i) if hosts else None)
                for i in range(connections)
            )
        )
        return runs

    return asyncio.run(drive_rounds())


def loopback_host(n: int) -> str:
    """The ``n``-th loopback address from 127.0.0.2 (all of 127.0.0.0/8 is this host's
    on Linux): a client host of its own."""
    n += 2
    return f"127.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
