"""The open-loop load of `cnnserve bench --overload --open-loop`: requests sent at a
fixed rate whatever the answers take, as k6's arrival-rate executors, vegeta and wrk2
send, where wrk and the gRPC load are closed loops (a connection's next request waits
for its answer).

The two call for different things from a server: holding a closed loop's refusals slows
its retries, holding an open loop's saves nothing and makes it open connections
(docs/failure-modes.md, "Open-loop load: refusals let go"). wrk cannot send an open
loop, so :func:`run_load` starts this module in a process of its own (its event loop
would otherwise share the probe's interpreter). It POSTs a random one of the bodies
``rate`` times a second for ``seconds``, each on an idle keep-alive connection when
there is one and else on a new one, as those generators do (their pool grows while
answers are slow), over raw asyncio streams (uvloop where installed: a few thousand
requests a second on one core), and prints JSON shaped like
:func:`service.bench.wrk.summarize`'s, with what only an open loop has: the rate it
kept, how late its sends were, the connections it opened and its 503s' latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import resource
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from service.bench.overload import CLIENT_TIMEOUT, percentile, rounded_ms
from service.cli_types import POSITIVE

# A send this far behind its moment means the generator, not the server, set the pace.
LATE_MS = 10.0
# How much of the rate it must keep for the level to be the open loop it says.
KEPT_SHARE = 0.95


class NoAnswer(Exception):
    """The connection closed, broke or sent something that is not HTTP/1.1."""

    def __init__(self, why: str, *, nothing: bool = False) -> None:
        super().__init__(why)
        self.nothing = nothing  # closed before the first byte of an answer


class Failed(Exception):
    """A request that got no answer, and why: connect, write, read (timeouts apart)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass
class Tally:
    """What the load counted: statuses (0: no answer), latencies by status, when each
    2xx/3xx came, lateness."""

    statuses: dict[str, int] = field(default_factory=dict)
    ms: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    late_ms: list[float] = field(default_factory=list)
    ok_at: list[float] = field(default_factory=list)  # monotonic
    opened: int = 0

    def add(self, status: int, ms: float) -> None:
        self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
        self.ms.setdefault(str(status), []).append(ms)
        if 200 <= status < 400:
            self.ok_at.append(time.monotonic())

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """One response read whole (interim 1xx answers skipped): its status, and whether
    the connection stays open."""
    first = True
    while True:
        line = await reader.readline()
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise NoAnswer("closed" if not line else "not HTTP/1.1", nothing=first and not line)
        first = False
        status, version = int(parts[1]), parts[0]
        length: int | None = None
        chunked, tokens = False, set()
        while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = header.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                tokens |= {token.strip() for token in value.split(b",")}
        if not 100 <= status < 200:
            break
    close = b"close" in tokens or (version == b"HTTP/1.0" and b"keep-alive" not in tokens)
    if status in (204, 304):  # no body, whatever the headers say (RFC 9112 6.3)
        pass
    elif chunked:
        while size := int((await reader.readline()).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        while await reader.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
    elif length is not None:
        await reader.readexactly(length)
    else:  # the body ends with the connection
        await reader.read()
        close = True
    return status, not close


_ANSWER_ERRORS = (OSError, RuntimeError, NoAnswer, asyncio.IncompleteReadError, ValueError)


@dataclass
class OpenLoop:
    host: str
    port: int
    requests: list[bytes]  # whole HTTP/1.1 requests, one sent at random each time
    rate: float
    seconds: float
    tls: ssl.SSLContext | None = None
    tally: Tally = field(default_factory=Tally)
    cpu_s: float = 0.0  # this process's CPU while it sent
    _idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)

    async def run(self) -> tuple[float, float]:
        """Sends for ``seconds``, then waits for every answer (CLIENT_TIMEOUT at most
        each): when the sending began and ended, on the monotonic clock."""
        rng = random.Random(0)
        count = round(self.rate * self.seconds)
        tasks: set[asyncio.Task[None]] = set()
        cpu = time.process_time()
        began = time.monotonic()
        for n in range(count):
            moment = began + n / self.rate
            ahead = moment - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
            task = asyncio.create_task(self._one(rng.choice(self.requests), moment))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        ended = time.monotonic()
        self.cpu_s = time.process_time() - cpu
        if tasks:
            await asyncio.wait(tasks)
        for _, writer in self._idle:
            writer.close()
        return began, ended

    async def _one(self, request: bytes, moment: float) -> None:
        self.tally.late_ms.append((time.monotonic() - moment) * 1e3)
        sent = time.monotonic()
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT):
                status = await self._exchange(request)
        except TimeoutError:
            self._failed("timeout", sent)
        except Failed as failed:
            self._failed(failed.kind, sent)
        else:
            self.tally.add(status, (time.monotonic() - sent) * 1e3)

    async def _exchange(self, request: bytes, pooled: bool = True) -> int:
        """``request`` sent and answered: on an idle connection when there is one, and
        once more on a new one when that gets no answer at all (a server may close an
        idle connection as it is reused, as HTTP clients, Go's and others, allow for)."""
        reader, writer, reused = await self._connection(pooled)
        try:
            writer.write(request)
            status, keep = await _answer(reader)
        except _ANSWER_ERRORS as exc:
            writer.close()
            unanswered = isinstance(exc, OSError | RuntimeError) or (
                isinstance(exc, NoAnswer) and exc.nothing
            )
            if reused and unanswered:
                return await self._exchange(request, pooled=False)
            raise Failed(_kind(exc)) from exc
        except BaseException:  # the client's timeout
            writer.close()
            raise
        if keep:
            self._idle.append((reader, writer))
        else:
            writer.close()
        return status

    async def _connection(
        self, pooled: bool
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """A connection, and whether it was reused: the last idle one (as a pool gives
        them) unless the server closed or reset it, else a new one."""
        while pooled and self._idle:
            reader, writer = self._idle.pop()
            if not (reader.at_eof() or writer.is_closing() or reader.exception()):
                return reader, writer, True
            writer.close()
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls)
        except OSError as exc:
            raise Failed("connect") from exc
        self.tally.opened += 1
        return reader, writer, False

    def _failed(self, kind: str, sent: float) -> None:
        self.tally.error(kind)
        self.tally.add(0, (time.monotonic() - sent) * 1e3)


def _kind(exc: BaseException) -> str:
    """An answer's failure: where it happened (a write fails with OSError or, under
    uvloop, RuntimeError on a closed transport)."""
    reading = NoAnswer | asyncio.IncompleteReadError | ValueError
    return "read" if isinstance(exc, reading) else "write"


def summary(loop: OpenLoop, began: float, ended: float) -> dict[str, Any]:
    """The tally → what a report shows (milliseconds, req/s), shaped like
    :func:`service.bench.wrk.summarize`'s with the open loop's own numbers. Goodput
    counts the answers that came while it sent, as wrk's counts those of its run: a
    server that queues what it cannot serve answers the rest after, and counted, they
    made a server of 50 a second serve 200 (an outside audit)."""
    tally = loop.tally
    window = ended - began + 1 / loop.rate  # the last send's share of time included

    def pct(status: str, q: float) -> float | None:
        return rounded_ms(percentile(tally.ms.get(status, []), q))

    ok = sum(n for s, n in tally.statuses.items() if 200 <= int(s) < 400)
    in_time = sum(1 for moment in tally.ok_at if moment <= ended)
    sent = sum(tally.statuses.values())
    late = sum(1 for ms in tally.late_ms if ms > LATE_MS)
    every = [ms for status, values in tally.ms.items() if status != "0" for ms in values]
    return {
        "requests": sent,
        "ok": ok,
        "requests_per_s": round(in_time / window, 1),
        "ok_after_window": ok - in_time,
        **{f"p{q}_ms": rounded_ms(percentile(every, q)) for q in (50, 90, 99)},
        "errors": tally.errors | {s: n for s, n in tally.statuses.items() if s[0] not in "023"},
        "statuses": {s: n for s, n in tally.statuses.items() if s != "0"},
        "seconds": loop.seconds,
        "rate": loop.rate,
        "sent_per_s": round(sent / window, 1),
        "late_share": round(late / len(tally.late_ms), 4) if tally.late_ms else 0.0,
        "late_p99_ms": rounded_ms(percentile(tally.late_ms, 99)),
        "connections_opened": tally.opened,
        "ok_p50_ms": pct("200", 50),
        "ok_p99_ms": pct("200", 99),
        "refused_p50_ms": pct("503", 50),
        "refused_p90_ms": pct("503", 90),
        "refused_p99_ms": pct("503", 99),
        "generator_cores": round(loop.cpu_s / window, 2),
        "load": f"open loop, {loop.rate:g} requests/s",
        "window_monotonic": [began, ended],
        "ok_per_second": per_second(tally.ok_at, began, ended),
    }


def per_second(moments: list[float], began: float, ended: float) -> list[int]:
    """How many of ``moments`` fell in each second from ``began`` to ``ended`` (the last
    perhaps part of one): goodput over the level, where a total hides a slow start."""
    counts = [0] * max(1, math.ceil(round(ended - began, 3)))  # not a second for 10.0001
    for moment in moments:
        if began <= moment <= ended:
            counts[min(int(moment - began), len(counts) - 1)] += 1
    return counts


def kept_rate(result: dict[str, Any]) -> bool:
    """Whether the generator sent at the rate it was asked (on time, nearly all of it):
    if not, the level measured a slower load than it says."""
    kept: bool = (
        result["sent_per_s"] >= KEPT_SHARE * result["rate"]
        and result["late_share"] <= 1 - KEPT_SHARE
    )
    return kept


def run_load(
    url: str, path: str, bodies: tuple[Path, ...], *, rate: float, seconds: float
) -> dict[str, Any]:
    """``rate`` requests a second for ``seconds`` from a process of its own: what
    :func:`service.bench.wrk.run_wrk` returns, for an open loop. Raises KeyRefused when
    the server answered 401 or 403."""
    cmd = [
        sys.executable,
        "-m",
        __name__,
        url.rstrip("/") + path,
        *("--rate", str(rate), "--seconds", str(seconds)),
        *map(str, bodies),
    ]
    from service.bench.wrk import KeyRefused, generator_result, key_refusals

    result = generator_result(cmd, seconds + CLIENT_TIMEOUT + 60, "open-loop load")
    refused = key_refusals(result["statuses"])
    if refused:
        raise KeyRefused(
            f"{url.rstrip('/')}{path} answered {sum(refused.values())} of "
            f"{result['requests']} requests 401 or 403: bench sends the first key of its own "
            "CNNSERVE_API_KEYS or CNNSERVE_API_KEYS_FILE; give it one the gateway knows"
        )
    return result


def requests_for(url: str, images: list[bytes], headers: dict[str, str]) -> list[bytes]:
    """Each image as a whole POST to ``url`` (its path and query), ``headers`` added."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return [
        (
            f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(image)}\r\n{extra}\r\n"
        ).encode("latin-1")
        + image
        for image in images
    ]


def main(argv: list[str] | None = None) -> int:
    from service.bench.wrk import key_headers

    parser = argparse.ArgumentParser(prog="python -m service.bench.open_loop")
    parser.add_argument("url", help="http(s)://host:port/path?query to POST to")
    parser.add_argument("bodies", nargs="+", type=Path)
    parser.add_argument("--rate", type=POSITIVE, required=True, help="requests a second")
    parser.add_argument("--seconds", type=POSITIVE, required=True)
    args = parser.parse_args(argv)
    # A pool that grows while answers are slow opens thousands of connections.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parts = urlsplit(args.url)
    tls = None
    if parts.scheme == "https":
        tls = ssl._create_unverified_context()  # measuring, not trusting: as wrk
    images = [path.read_bytes() for path in args.bodies]
    loop = OpenLoop(
        parts.hostname or "127.0.0.1",
        parts.port or (443 if tls else 80),
        requests_for(args.url, images, key_headers()),
        args.rate,
        args.seconds,
        tls,
    )
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    began, ended = asyncio.run(loop.run())
    result = summary(loop, began, ended)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
