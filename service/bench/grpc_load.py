"""The gRPC side of `cnnserve bench --overload --protocol grpc`.

wrk speaks HTTP/1.1 only, so gRPC's load is Python: :func:`run_load` starts this module
in a process of its own (its event loop would otherwise share the probe's interpreter),
which keeps ``calls`` Classify calls in flight over connections of
:data:`CALLS_PER_CONNECTION` calls each, sends each call's successor as soon as it is
answered (a RESOURCE_EXHAUSTED too, as wrk retries a 503) and prints what it counted
as JSON, shaped like :func:`service.bench.wrk.summarize`'s. :class:`GrpcClient` is the
probe and the spinner beside it: one call at a time on a connection of its own.

Statuses are HTTP's where gRPC's code has one here (OK 200, RESOURCE_EXHAUSTED 503,
DEADLINE_EXCEEDED 504, UNAUTHENTICATED 401, PERMISSION_DENIED 403); any other code is
counted under its name, so that the "only 200s and 503s" target sees it. A gateway that
refuses the key fails the run at once (:class:`~service.bench.wrk.KeyRefused`), as wrk's
does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from service.bench.overload import CLIENT_TIMEOUT, Sample, percentile, rounded_ms
from service.proto_gen import cnnserve_v1_pb2, cnnserve_v1_pb2_grpc

# A connection's share of the load: half the server's default streams a connection (a
# batch, 32), as a client keeping many calls in flight opens several connections.
CALLS_PER_CONNECTION = 16
# A connection of its own per channel (channels to one target share one by default).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
_HTTP_LIKE = {
    grpc.StatusCode.OK: "200",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "503",
    grpc.StatusCode.DEADLINE_EXCEEDED: "504",
    grpc.StatusCode.UNAUTHENTICATED: "401",
    grpc.StatusCode.PERMISSION_DENIED: "403",
}
# No answer, as a refused or reset HTTP connection is status 0 to the REST clients.
_NO_ANSWER = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


def status_of(code: grpc.StatusCode) -> str:
    """HTTP's status for ``code`` where it has one here, else the code's name."""
    name: str = _HTTP_LIKE.get(code) or code.name
    return name


# At least this many connections (fewer calls: one each), the calls shared evenly among
# them. The kernel gives each connection to one worker, and gRPC connections stay there:
# the capacity level's 32 calls on 2 connections found both on one worker in about half
# the runs, its sibling idle, so capacity read as one worker's and goodput at 4x as
# 130-151% of it (2 workers, default model).
MIN_CONNECTIONS = 8


def connections_for(calls: int) -> int:
    """Connections for ``calls`` in flight: CALLS_PER_CONNECTION each at most, and at
    least MIN_CONNECTIONS."""
    return max(min(calls, MIN_CONNECTIONS), math.ceil(calls / CALLS_PER_CONNECTION))


def key_metadata() -> tuple[tuple[str, str], ...]:
    """The API key wrk sends (:func:`service.bench.wrk.key_headers`), as call metadata."""
    from service.bench.wrk import key_headers

    return tuple((name.lower(), value) for name, value in key_headers().items())


def _request(model: str, version: int | None, image: bytes) -> cnnserve_v1_pb2.ClassifyRequest:
    request = cnnserve_v1_pb2.ClassifyRequest(image=image, model=model)
    if version is not None:
        request.version = version
    return request


@dataclass
class GrpcClient:
    """Classify calls one at a time on a connection of its own until stopped, each
    followed by ``pause`` seconds (a refusal's too): the gRPC twin of
    :class:`service.bench.overload.Client`, with its samples (status as an int: 0 for no
    answer, 500 for a code with no HTTP status here)."""

    target: str
    model: str
    version: int | None
    images: list[bytes]
    pause: float
    origin: float
    samples: list[Sample] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        metadata = key_metadata()
        rng = random.Random(id(self))
        with grpc.insecure_channel(self.target, options=OWN_CONNECTION) as channel:
            classify = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel).Classify  # type: ignore[no-untyped-call]
            while not stop.is_set():
                request = _request(self.model, self.version, rng.choice(self.images))
                sent = time.monotonic()
                try:
                    classify(request, timeout=CLIENT_TIMEOUT, metadata=metadata)
                    status = 200
                except grpc.RpcError as exc:
                    code = exc.code()
                    name = status_of(code)
                    status = 0 if code in _NO_ANSWER else int(name) if name.isdigit() else 500
                self.samples.append(
                    Sample(sent - self.origin, status, (time.monotonic() - sent) * 1e3)
                )
                if self.pause:
                    stop.wait(self.pause)


def run_load(
    target: str,
    model: str,
    version: int | None,
    bodies: tuple[Path, ...],
    *,
    calls: int,
    seconds: float,
) -> dict[str, Any]:
    """``calls`` Classify calls kept in flight for ``seconds``, from a process of their
    own; what :func:`service.bench.wrk.run_wrk` returns, for gRPC."""
    cmd = [
        sys.executable,
        "-m",
        __name__,
        target,
        model,
        "--calls",
        str(calls),
        "--seconds",
        str(seconds),
        *(("--version", str(version)) if version is not None else ()),
        *map(str, bodies),
    ]
    from service.bench.wrk import KeyRefused, generator_result, key_refusals

    result = generator_result(cmd, seconds + 60, "gRPC load")
    refused = key_refusals(result["statuses"])
    if refused:
        raise KeyRefused(
            f"gRPC {target} refused {sum(refused.values())} of {result['requests']} Classify "
            "calls (UNAUTHENTICATED or PERMISSION_DENIED): bench sends the first key of its "
            "own CNNSERVE_API_KEYS or CNNSERVE_API_KEYS_FILE; give it one the gateway knows"
        )
    return result


async def _load(
    target: str, model: str, version: int | None, images: list[bytes], calls: int, seconds: float
) -> dict[str, Any]:
    metadata = key_metadata()
    channels = [
        grpc.aio.insecure_channel(target, options=OWN_CONNECTION)
        for _ in range(connections_for(calls))
    ]
    statuses: dict[str, int] = {}
    answered: list[float] = []  # the 200s' latencies, ms
    rng = random.Random(0)
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), CLIENT_TIMEOUT)
        began = time.monotonic()

        async def keep_one_in_flight(channel: grpc.aio.Channel) -> None:
            classify = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel).Classify  # type: ignore[no-untyped-call]
            while True:
                request = _request(model, version, rng.choice(images))
                sent = time.monotonic()
                try:
                    await classify(request, timeout=CLIENT_TIMEOUT, metadata=metadata)
                    status = "200"
                except grpc.aio.AioRpcError as exc:
                    status = status_of(exc.code())
                statuses[status] = statuses.get(status, 0) + 1
                if status == "200":
                    answered.append((time.monotonic() - sent) * 1e3)

        # As wrk: stopped when the time is up, the calls in flight given up (draining
        # them, paced refusals took up to 2 s more, counted as load after the run).
        tasks = [
            asyncio.create_task(keep_one_in_flight(channels[i % len(channels)]))
            for i in range(calls)
        ]
        await asyncio.sleep(seconds)
        ended = time.monotonic()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for channel in channels:
            await channel.close()

    def pct(q: float) -> float | None:
        return rounded_ms(percentile(answered, q))

    ok = statuses.get("200", 0)
    return {
        "requests": sum(statuses.values()),
        "ok": ok,
        "requests_per_s": round(ok / seconds, 1),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "errors": {s: n for s, n in statuses.items() if s != "200"},
        "statuses": statuses,
        "seconds": seconds,
        "load": f"gRPC Classify, {calls} calls in flight over {len(channels)} connections",
        # When the load ran, on the monotonic clock every process shares: not this
        # process's start-up, connecting or ending.
        "window_monotonic": [began, ended],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.bench.grpc_load")
    parser.add_argument("target")
    parser.add_argument("model")
    parser.add_argument("bodies", nargs="+", type=Path)
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--version", type=int, default=None)
    args = parser.parse_args(argv)
    images = [path.read_bytes() for path in args.bodies]
    result = asyncio.run(
        _load(args.target, args.model, args.version, images, args.calls, args.seconds)
    )
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
