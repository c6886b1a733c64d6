"""An open loop of gRPC Classify calls: sent at a fixed rate, whatever the answers take.

`cnnserve bench --overload --open-loop` sends its open loop over REST only; this is the
gRPC one behind docs/failure-modes.md's "Open loops over gRPC":

    python loadtests/grpc_open_loop.py 127.0.0.1:8500 --rate 1600 --seconds 10 \\
        --connections 8 --timeout 1 docs/samples/ankle_boot.png

Calls go round-robin over ``--connections`` channels, each a connection of its own, and
each has the ``--timeout`` deadline. It prints one JSON object: the calls sent and the
rate kept, the count of each status, the OK and RESOURCE_EXHAUSTED latencies (ms) and
the most calls outstanding at once (those the client held, waiting for a stream,
included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import grpc

from service.bench.overload import percentile
from service.proto_gen import cnnserve_v1_pb2, cnnserve_v1_pb2_grpc

# A connection of its own per channel (channels to one target share one by default).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


async def run(
    target: str,
    model: str,
    images: list[bytes],
    *,
    rate: float,
    seconds: float,
    connections: int,
    timeout: float,
) -> dict[str, Any]:
    channels = [
        grpc.aio.insecure_channel(target, options=OWN_CONNECTION) for _ in range(connections)
    ]
    statuses: Counter[str] = Counter()
    latencies: defaultdict[str, list[float]] = defaultdict(list)
    outstanding = most = 0

    async def call(classify: Any, image: bytes) -> None:
        nonlocal outstanding, most
        outstanding += 1
        most = max(most, outstanding)
        sent = time.monotonic()
        try:
            await classify(
                cnnserve_v1_pb2.ClassifyRequest(image=image, model=model), timeout=timeout
            )
            status = "OK"
        except grpc.aio.AioRpcError as exc:
            status = exc.code().name
        outstanding -= 1
        statuses[status] += 1
        latencies[status].append((time.monotonic() - sent) * 1e3)

    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)
        stubs = [cnnserve_v1_pb2_grpc.ImageClassifierStub(c).Classify for c in channels]  # type: ignore[no-untyped-call]
        loop = asyncio.get_running_loop()
        began, sent, tasks = loop.time(), 0, []
        while (due := sent / rate) < seconds:  # each call at its moment, late or not
            wait = began + due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(
                asyncio.create_task(call(stubs[sent % connections], images[sent % len(images)]))
            )
            sent += 1
        sending = loop.time() - began
        await asyncio.gather(*tasks)
    finally:
        for channel in channels:
            await channel.close()

    def pct(status: str, q: float) -> float | None:
        value = percentile(latencies[status], q)
        return None if value is None else round(value, 1)

    return {
        "sent": sent,
        "rate_kept": round(sent / max(sending, seconds), 1),  # behind: less
        "statuses": dict(statuses),
        "ok_p50_ms": pct("OK", 50),
        "ok_p99_ms": pct("OK", 99),
        "refused_p50_ms": pct("RESOURCE_EXHAUSTED", 50),
        "refused_p90_ms": pct("RESOURCE_EXHAUSTED", 90),
        "most_outstanding": most,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="host:port of the gRPC server")
    parser.add_argument("images", nargs="+", type=Path, help="image files, sent in turn")
    parser.add_argument("--model", default="fashion_mnist")
    parser.add_argument("--rate", type=float, required=True, help="calls a second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=10.0, help="each call's deadline, s")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.connections < 1 or args.timeout <= 0:
        parser.error("--rate, --seconds and --timeout must be positive, --connections 1 or more")
    result = asyncio.run(
        run(
            args.target,
            args.model,
            [path.read_bytes() for path in args.images],
            rate=args.rate,
            seconds=args.seconds,
            connections=args.connections,
            timeout=args.timeout,
        )
    )
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
