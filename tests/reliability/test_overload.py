"""Overload is shed, not absorbed as latency: under 4x the load the server serves at
full speed, only 200s and 503s come back, 503s come fast, goodput holds, admitted
latency stays near unloaded plus the budget, memory stays flat, readiness holds, and
full speed returns as soon as load drops. Bounds are generous: the machine is shared."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import signal
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from service.bench.grpc_load import GrpcClient, run_load
from service.bench.overload import Sample, running
from service.concurrency import MAX_REFUSAL_DEBT_SECONDS, MAX_REFUSAL_WAIT_SECONDS
from service.proto_gen import cnnserve_v1_pb2, cnnserve_v1_pb2_grpc
from tests.helpers.errors import error_of
from tests.helpers.images import encode, gradient
from tests.helpers.load import Outcome, Run, burst, bursts, load, open_loop, post, quantile
from tests.helpers.server import (
    Server,
    accepted_by,
    eventually,
    read_response,
    running_server,
    workers_of,
)

BUDGET = 0.08  # the default queue-wait budget
BASE_CONNECTIONS = 16  # about where goodput stops growing here
SECONDS = 4.0
PNG_TYPE = {"content-type": "image/png"}
PNG = encode(gradient(), "PNG")
LARGE_PNG = encode(gradient(640, 480), "PNG")  # 2 KB, 3-5 ms to decode and resize
REQUEST = post("/v1/classify", PNG, "image/png")
PROBE = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def server(tiny_repo_litert: Path) -> Iterator[Server]:
    env = {"CNNSERVE_POLL_SECONDS": "0", "CNNSERVE_ACCESS_LOG": "false"}
    with running_server(tiny_repo_litert, env=env) as started:
        yield started


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match
    return int(match.group(1)) * 1024


def shed_counts(server: Server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("cnnserve_overload_rejections_total{"):
            reason = re.search(r'reason="([^"]+)"', line)
            assert reason
            counts[reason.group(1)] = counts.get(reason.group(1), 0) + float(line.split()[-1])
    return counts


def paced(rate: float, places: int = 1) -> dict[str, str]:
    """Settings for a worker of ``places`` whose refusals are paced at ``rate`` a second
    (a bucket of one), counting a retry as at once within 0.5 s: a retry sent at once
    may reach a loaded machine's server late."""
    return {
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_MAX_CONCURRENT_REQUESTS": str(places),
        "CNNSERVE_MAX_REFUSALS_PER_SECOND": str(rate),
        "CNNSERVE_RETRY_AT_ONCE_SECONDS": "0.5",
    }


@contextmanager
def full_worker(repo: Path, env: dict[str, str], places: int = 1) -> Iterator[Server]:
    """A running server (REST and gRPC) whose ``places`` are held by requests whose
    body has not come (CNNSERVE_ADMIT_AT=headers: such a request holds its place),
    refusing; at the end the held requests are answered."""
    env = {**env, "CNNSERVE_ADMIT_AT": "headers"}
    with running_server(repo, grpc_port=0, env=env) as server:
        holders = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(places)]
        try:
            head, _, body = REQUEST.partition(b"\r\n\r\n")
            for holder in holders:  # headers only: each holds a place
                holder.sendall(head + b"\r\n\r\n")
            eventually(lambda: burst(server.port, REQUEST, 1).statuses() == {503}, timeout=30)
            yield server
            for holder in holders:
                holder.sendall(body)
                assert holder.recv(65536).startswith(b"HTTP/1.1 200")
        finally:
            for holder in holders:
                holder.close()


@contextmanager
def readiness_polled(server: Server) -> Iterator[list[int]]:
    """/readyz polled every 0.2 s on a client of its own while the block runs: the
    statuses it got."""
    probes: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while not stop.wait(0.2):
                probes.append(client.get("/readyz").status_code)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        yield probes
    finally:
        stop.set()
        prober.join()


def test_four_times_overload_is_shed_fast_and_recovers(server: Server) -> None:
    load(server.port, REQUEST, BASE_CONNECTIONS, 1.0)  # warm up
    unloaded = load(server.port, REQUEST, 1, 2.0)
    assert unloaded.statuses() == {200}
    unloaded_p99 = quantile(unloaded.of(200), 0.99)
    capacity = load(server.port, REQUEST, BASE_CONNECTIONS, SECONDS)
    assert capacity.statuses() <= {200, 503}

    with readiness_polled(server) as probes:
        # Twice: the first reaches the overload's working set, the second must not grow it.
        load(server.port, REQUEST, 4 * BASE_CONNECTIONS, SECONDS)
        rss_before = rss_bytes(server.process.pid)
        overload = load(server.port, REQUEST, 4 * BASE_CONNECTIONS, SECONDS)
        rss_after = rss_bytes(server.process.pid)
    after = load(server.port, REQUEST, 1, 2.0)

    admitted, shed = overload.of(200), overload.of(503)
    report = (
        f"unloaded p50 {quantile(unloaded.of(200), 0.5) * 1e3:.1f} ms "
        f"p99 {unloaded_p99 * 1e3:.1f} ms; "
        f"capacity {capacity.rate():.0f}/s at {BASE_CONNECTIONS} connections; overload at "
        f"{4 * BASE_CONNECTIONS}: goodput {overload.rate():.0f}/s, admitted p50 "
        f"{quantile(admitted, 0.5) * 1e3:.1f} p99 {quantile(admitted, 0.99) * 1e3:.1f} ms, "
        f"{len(shed)} shed, 503 p50 {quantile(shed, 0.5) * 1e3:.1f} p99 "
        f"{quantile(shed, 0.99) * 1e3:.1f} ms; rss {rss_before >> 20} -> {rss_after >> 20} MiB; "
        f"after: p50 {quantile(after.of(200), 0.5) * 1e3:.1f} ms; "
        f"shed by reason {shed_counts(server)}"
    )
    print(report)
    assert overload.statuses() <= {200, 503}, report
    assert all(o.retry_after for o in overload.outcomes if o.status == 503)
    # The targets are goodput >= 70% of capacity and admitted p99 <= 2x unloaded +
    # budget (measured here: ~100% and ~35 ms against ~55 ms); these clients retry a 503
    # at once (as wrk does) from the same two shared cores, so the bounds leave room for
    # a noisy machine: half the capacity, and 100 ms over the target.
    assert overload.rate() >= 0.5 * capacity.rate(), report
    assert quantile(admitted, 0.99) <= 2 * unloaded_p99 + BUDGET + 0.1, report
    if shed:
        assert quantile(shed, 0.5) <= 0.25, report
        assert sum(shed_counts(server).values()) >= len(shed)
    assert probes and set(probes) == {200}, probes
    assert rss_after - rss_before < 64 * 2**20, report
    assert after.statuses() == {200}
    assert quantile(after.of(200), 0.5) <= 3 * quantile(unloaded.of(200), 0.5) + 0.02, report


MANY = 16  # images in each request of the many-image load
MANY_CONNECTIONS = 4  # about where its goodput stops growing here


def multipart(images: list[bytes]) -> bytes:
    boundary = "cnnserve-many"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{i}.jpg"'
        f"\r\nContent-Type: image/jpeg\r\n\r\n".encode()
        + image
        + b"\r\n"
        for i, image in enumerate(images)
    )
    body = parts + f"--{boundary}--\r\n".encode()
    return post("/v1/classify", body, f"multipart/form-data; boundary={boundary}")


def test_four_times_overload_of_many_image_requests_is_shed_before_decoding(
    server: Server,
) -> None:
    """Admission counts the images other requests are still decoding, and how long
    decoding and waits lately took against their estimates: counted only once queued,
    requests of 16 images at 4x passed admission together (4 refused to ~400 served)
    and waited 2-3 budgets. The concurrency limit's floor is in images: counted in
    requests, it held all 16 connections' requests (8 batches of images) in flight and
    their admitted p99 was 143-170 ms."""
    request = multipart([encode(gradient(), "JPEG")] * MANY)
    load(server.port, request, MANY_CONNECTIONS, 1.0)  # warm up
    unloaded = load(server.port, request, 1, 2.0)
    unloaded_p99 = quantile(unloaded.of(200), 0.99)
    capacity = load(server.port, request, MANY_CONNECTIONS, SECONDS)
    # Twice: the first brings the limit down from the floor of single images (~1 s of
    # windows cutting it by a fifth each); the second is what such a load gets.
    load(server.port, request, 4 * MANY_CONNECTIONS, SECONDS)
    overload = load(server.port, request, 4 * MANY_CONNECTIONS, SECONDS)
    limit = concurrency_limit(server)
    admitted, shed = overload.of(200), overload.of(503)
    report = (
        f"unloaded p99 {unloaded_p99 * 1e3:.1f} ms; capacity {capacity.rate() * MANY:.0f} "
        f"images/s; at 4x: {overload.rate() * MANY:.0f} images/s, admitted p50 "
        f"{quantile(admitted, 0.5) * 1e3:.1f} p99 {quantile(admitted, 0.99) * 1e3:.1f} ms, "
        f"{len(shed)} shed, 503 p50 {quantile(shed, 0.5) * 1e3:.1f} ms; limit {limit}; "
        f"shed by reason {shed_counts(server)}"
    )
    print(report)
    assert overload.statuses() <= {200, 503}, report
    # Shed, not absorbed as latency: these clients retry a 503 at once, so refusals
    # outnumber what is served (measured ~7 to 1; before, 4 refusals to ~400 served).
    assert len(shed) >= len(admitted), report
    # The 70% goodput target, less this shared machine's 30% between runs and more
    # (measured 82-109%).
    assert overload.rate() >= 0.4 * capacity.rate(), report
    # Fewer requests in flight than the one-image floor (half a batch, 16 requests).
    assert limit < 16, report
    # The target, 2x unloaded + the budget, with 30 ms for a noisy machine (measured
    # 68-88 ms against ~115).
    assert quantile(admitted, 0.99) <= 2 * unloaded_p99 + BUDGET + 0.03, report
    assert quantile(shed, 0.5) <= 0.25, report


def test_four_times_grpc_overload_of_many_image_lists_is_held_to_the_target(
    tiny_repo_litert: Path,
) -> None:
    """The same load over gRPC (ClassifyBatch of 16 images, a connection per caller,
    retrying RESOURCE_EXHAUSTED at once): the images a call carries count against the
    concurrency limit's floor as over REST. Counted as one request each, 16 such calls
    were all let in: admitted p99 174-201 ms (67-106 now). Their refusals are paced by
    what they cost (GRPC_REFUSAL_COST): counted as HTTP refusals, goodput fell short."""
    batch = cnnserve_v1_pb2.ClassifyBatchRequest(
        images=[encode(gradient(), "JPEG")] * MANY, model="tiny"
    )

    async def calls(port: int, callers: int, seconds: float) -> Run:
        run = Run(seconds)

        async def caller(until: float) -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
                await spin(run, until, lambda: stub.ClassifyBatch(batch, timeout=10))

        until = time.monotonic() + seconds
        await asyncio.gather(*(caller(until) for _ in range(callers)))
        return run

    env = {"CNNSERVE_POLL_SECONDS": "0", "CNNSERVE_ACCESS_LOG": "false"}
    with running_server(tiny_repo_litert, grpc_port=0, env=env) as server:
        asyncio.run(calls(server.grpc_port, MANY_CONNECTIONS, 1.0))  # warm up
        unloaded = asyncio.run(calls(server.grpc_port, 1, 2.0))
        capacity = asyncio.run(calls(server.grpc_port, MANY_CONNECTIONS, SECONDS))
        asyncio.run(calls(server.grpc_port, 4 * MANY_CONNECTIONS, SECONDS))  # as over REST
        overload = asyncio.run(calls(server.grpc_port, 4 * MANY_CONNECTIONS, SECONDS))
        limit = concurrency_limit(server)
    unloaded_p99 = quantile(unloaded.of(200), 0.99)
    admitted = overload.of(200)
    report = (
        f"unloaded p99 {unloaded_p99 * 1e3:.1f} ms; capacity {capacity.rate() * MANY:.0f} "
        f"images/s; at 4x: {overload.rate() * MANY:.0f} images/s, admitted p99 "
        f"{quantile(admitted, 0.99) * 1e3:.1f} ms, {len(overload.of(503))} refused; "
        f"limit {limit}"
    )
    print(report)
    assert unloaded.statuses() == {200} and overload.statuses() <= {200, 503}, report
    # The target: measured 88-107%, and 52-72% while a refused call took one
    # token of the refusal pace, as an HTTP refusal does, for several times its CPU.
    assert overload.rate() >= 0.7 * capacity.rate(), report
    assert limit < 16, report
    assert quantile(admitted, 0.99) <= 2 * unloaded_p99 + BUDGET + 0.03, report


STREAMS = 32  # the calls a connection carries at once (the default stream limit)


def test_grpc_calls_waiting_in_its_core_on_few_connections_are_shed(
    tiny_repo_litert: Path,
) -> None:
    """Many calls on few connections (h2load -c 4 -m 32; ghz keeps its calls on one):
    grpc.aio takes a listener's calls from its core one at a time, so most waited there,
    unseen by admission. 128 calls on 4 connections were all answered and none refused,
    at p99 ~170 ms (the default model, 2 workers), and here 0 of ~2,500 refused. Now the
    calls waiting in the core are counted as held (service.api.grpc_backlog): some are
    refused, and the admitted are answered near unloaded plus the budget."""
    image = encode(gradient(), "PNG")

    async def calls(port: int, connections: int, each: int, seconds: float) -> Run:
        run = Run(seconds)
        until = time.monotonic() + seconds

        async def caller(stub: cnnserve_v1_pb2_grpc.ImageClassifierStub) -> None:
            request = cnnserve_v1_pb2.ClassifyRequest(image=image, model="tiny")
            await spin(run, until, lambda: stub.Classify(request, timeout=10))

        channels = [
            grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(connections)
        ]
        try:
            stubs = [cnnserve_v1_pb2_grpc.ImageClassifierStub(c) for c in channels]
            await asyncio.gather(*(caller(stub) for stub in stubs for _ in range(each)))
        finally:
            await asyncio.gather(*(c.close() for c in channels))
        return run

    env = {"CNNSERVE_POLL_SECONDS": "0", "CNNSERVE_ACCESS_LOG": "false"}
    with running_server(tiny_repo_litert, grpc_port=0, env=env) as server:
        asyncio.run(calls(server.grpc_port, 1, 8, 1.0))  # warm up
        unloaded = asyncio.run(calls(server.grpc_port, 1, 1, 2.0))
        capacity = asyncio.run(calls(server.grpc_port, 1, STREAMS, SECONDS))
        asyncio.run(calls(server.grpc_port, 4, STREAMS, SECONDS))  # as the tests above
        overload = asyncio.run(calls(server.grpc_port, 4, STREAMS, SECONDS))
        text = httpx.get(server.url + "/metrics", timeout=10).text
    assert re.search(r"^cnnserve_grpc_calls_waiting \S+$", text, re.MULTILINE), text
    admitted = overload.of(200)
    bound = 2 * quantile(unloaded.of(200), 0.99) + BUDGET + 0.03
    report = (
        f"capacity {capacity.rate():.0f} a second; 128 calls on 4 connections: "
        f"{len(admitted) / SECONDS:.0f} answered a second, p99 "
        f"{quantile(admitted, 0.99) * 1e3:.1f} ms (bound {bound * 1e3:.0f}), "
        f"{len(overload.of(503))} refused"
    )
    print(report)
    assert overload.statuses() <= {200, 503} and overload.of(503), report
    assert quantile(admitted, 0.99) <= bound, report
    # Capacity here is one connection's: its calls wait on one listener (109-122% seen).
    assert len(admitted) / SECONDS >= 0.7 * capacity.rate(), report


async def spin(run: Run, until: float, call: Callable[[], Awaitable[Any]]) -> None:
    """Make ``call`` until ``until``, each at once after the last answer, noting its
    status (RESOURCE_EXHAUSTED as 503, any other failure as 0) and time in ``run``."""
    while time.monotonic() < until:
        began = time.perf_counter()
        try:
            await call()
            status = 200
        except grpc.aio.AioRpcError as exc:
            status = 503 if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else 0
        run.outcomes.append(Outcome(status, time.perf_counter() - began))


def concurrency_limit(server: Server) -> float:
    """The worker's concurrency limit now (cnnserve_concurrency_limit)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    found = re.search(r"^cnnserve_concurrency_limit (\S+)$", text, re.MULTILINE)
    assert found, "no cnnserve_concurrency_limit"
    return float(found.group(1))


def test_requests_over_the_concurrency_limit_are_refused_before_their_body(
    tiny_repo_litert: Path,
) -> None:
    """Admitted at their headers (CNNSERVE_ADMIT_AT=headers), two requests whose body has
    not arrived hold the worker's two places (a limit of 2): a third is refused at once,
    over REST and gRPC alike, probes still answer, and the places are free again once
    the two are answered."""
    env = {
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_MAX_CONCURRENT_REQUESTS": "2",
        "CNNSERVE_ADMIT_AT": "headers",
    }
    png = encode(gradient(), "PNG")
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(png)}\r\n\r\n"
    ).encode()
    with running_server(tiny_repo_litert, grpc_port=0, env=env) as server:
        holders = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        try:
            for sock in holders:
                sock.sendall(head)  # headers only: admitted, waiting for the body
            with server.client() as client:

                def classify() -> httpx.Response:
                    return client.post("/v1/classify", content=png, headers=PNG_TYPE)

                eventually(lambda: classify().status_code == 503, timeout=30)
                r = classify()
                assert r.status_code == 503 and r.headers["retry-after"]
                assert error_of(r)[0] == "overloaded"
                assert "its limit" in error_of(r)[1]
                assert client.get("/readyz").status_code == 200
                assert client.get("/healthz").status_code == 200
                assert client.get("/metrics").status_code == 200
                # A model's status and metadata are answered from memory, as TF Serving
                # does under any load: a gateway polling them turned unready.
                assert client.get("/v1/models/tiny").status_code == 200
                assert client.get("/v1/models/tiny/metadata").status_code == 200
                with server.channel() as channel:
                    stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)  # type: ignore[no-untyped-call]
                    with pytest.raises(grpc.RpcError) as shed:
                        stub.Classify(cnnserve_v1_pb2.ClassifyRequest(image=png), timeout=10)
                    assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                for sock in holders:
                    sock.sendall(png)
                    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
                assert classify().status_code == 200
                assert shed_counts(server).get("concurrency", 0) >= 2
        finally:
            for sock in holders:
                sock.close()


def test_stalled_uploads_hold_no_place_by_default(tiny_repo_litert: Path) -> None:
    """Requests that sent their headers and one byte of body take no place until the
    body is in: 20 of them beside a limit of 4 refuse nothing, on the direct path (raw
    body) and the app's (multipart) alike, gRPC included, and the adaptive limit does
    not count their wait (a review shut a worker out with ~40 such sockets every 30 s,
    its limit cut from 1,024 to its floor, while /readyz said 200)."""
    env = {"CNNSERVE_POLL_SECONDS": "0", "CNNSERVE_MAX_CONCURRENT_REQUESTS": "4"}
    png = encode(gradient(), "PNG")
    heads = [
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 100\r\n\r\nx",
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100\r\n\r\n--",
    ]
    with running_server(tiny_repo_litert, grpc_port=0, env=env) as server:
        stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
        try:
            for i, sock in enumerate(stalled):
                sock.sendall(heads[i % 2])
            with server.client() as client:
                for _ in range(10):
                    one = client.post("/v1/classify", content=png, headers=PNG_TYPE)
                    assert one.status_code == 200, one.text
                    form = client.post("/v1/classify", files={"image": ("a.png", png)})
                    assert form.status_code == 200, form.text
                with server.channel() as channel:
                    stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)  # type: ignore[no-untyped-call]
                    assert stub.Classify(cnnserve_v1_pb2.ClassifyRequest(image=png), timeout=10)
                assert shed_counts(server).get("concurrency", 0) == 0
        finally:
            for sock in stalled:
                sock.close()


def test_only_clients_retrying_at_once_wait_for_the_refusal_pace(
    tiny_repo_litert: Path,
) -> None:
    """With the worker full and its refusal bucket spent, each client's first 503 is
    answered at once (each client from a host of its own), while the 503s of clients
    that retry at once on their connection are refused at no more than
    CNNSERVE_MAX_REFUSALS_PER_SECOND, each waiting its turn. Bounds are far apart: a
    lower bound on the retries' wait, and for the first answers half of what the pace
    would have made the last of them wait."""
    rate = 4.0
    connections = 12
    with full_worker(tiny_repo_litert, paced(rate)) as server:
        first, retried = bursts(server.port, REQUEST, connections, 2, hosts=True)
        assert first.statuses() == retried.statuses() == {503}
        assert first.of(503)[-1] < (connections - 1) / rate / 2, first.of(503)
        # The retries queue behind one another: the middle one waited for the turns of
        # about half the others (a retry the client sent late counts as not spinning).
        half = connections // 2
        assert retried.of(503)[half] >= (half - 1) / rate, retried.of(503)


def test_refusals_past_the_access_logs_budget_are_counted_in_a_line_a_second(
    tiny_repo_litert: Path,
) -> None:
    """A worker refusing thousands a second logs a line for each of the first
    CNNSERVE_ACCESS_LOG_REFUSALS_PER_SECOND of them in a second; the rest are counted
    in one line a second (a line each was ~10% of a refusal's CPU, and ~1 MB/s of log).
    Logged and counted, they add up to every 503 the metrics counted."""
    budget = 20
    env = {
        **paced(0),  # unpaced: as many refusals as the clients send
        "CNNSERVE_ACCESS_LOG": "true",
        "CNNSERVE_ACCESS_LOG_REFUSALS_PER_SECOND": str(budget),
    }
    with full_worker(tiny_repo_litert, env) as server:
        began = time.time()
        run = load(server.port, REQUEST, 4, 2.0)
        assert run.statuses() == {503} and len(run.of(503)) > 4 * budget, len(run.of(503))
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        refused = sum(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("cnnserve_requests_total{") and 'code="503"' in line
        )

        def lines() -> tuple[list[dict[str, object]], int]:
            logged, counted = [], 0
            for text in server.log.read_text().splitlines():
                if not text.startswith('{"time"'):
                    continue
                line = json.loads(text)
                if "not_logged" in line:
                    assert line["status"] == 503 and line["route"] == "/v1/classify", line
                    counted += int(line["not_logged"])  # type: ignore[call-overload]
                elif line["status"] == 503:
                    logged.append(line)
            return logged, counted

        def accounted() -> bool:
            logged, counted = lines()
            return len(logged) + counted == refused

        eventually(accounted, timeout=10)  # a second's count is written within a second
    logged, counted = lines()
    assert counted > 0
    per_second = Counter(str(line["time"]) for line in logged)
    # Not the second the load began in: full_worker's check before it met 503s answered
    # by the app, not at the headers, which are logged one by one.
    del per_second[time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(int(began)))]
    assert per_second and max(per_second.values()) <= budget, per_second


def test_a_paced_503_comes_before_the_requests_timeout_passes(tiny_repo_litert: Path) -> None:
    """A client retrying at once waits its turn for its 503, but not past its
    X-Request-Timeout: it would be waiting still when it gave up, and be told of a
    timeout rather than to back off (gRPC's refusals come within the call's deadline
    likewise)."""
    rate = 0.5  # a turn every 2 s: a retry waits for 1-2 s (MAX_REFUSAL_WAIT_SECONDS)
    timed = post("/v1/classify", PNG, "image/png", {"X-Request-Timeout": "0.3"})
    with (
        full_worker(tiny_repo_litert, paced(rate)) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as client,
    ):
        times = []
        for request in (REQUEST, timed, REQUEST):  # the later two: retries at once
            began = time.perf_counter()
            client.sendall(request)
            assert read_response(client)[0].startswith(b"HTTP/1.1 503")
            times.append(time.perf_counter() - began)
    # 0.5 s: 0.9 of its timeout, but no sooner than a retry counts as at once (paced())
    assert times[1] < 0.9, times
    assert times[2] >= 1 / rate / 2, times  # the same retry without it waits its turn


def test_a_client_reconnecting_at_once_after_each_503_waits_for_the_pace(
    tiny_repo_litert: Path,
) -> None:
    """A client that opens a new connection for each request (``Connection: close``, as
    urllib, ``ab`` or ``requests`` without a session do) and sends the next at once
    after a 503 is known by its host: its refusals wait for the pace, while another
    host's first 503 still comes at once. Unpaced, such clients at twice the load a
    worker served (wrk, 32 connections) were refused ~3,600 times a second and ~210 of
    ~1,080 requests a second were served."""
    rate = 4.0
    request = post("/v1/classify", PNG, "image/png", {"Connection": "close"})
    with full_worker(tiny_repo_litert, paced(rate)) as server:
        began = time.perf_counter()
        runs = [burst(server.port, request, 1) for _ in range(8)]
        spent = time.perf_counter() - began
        assert all(run.statuses() == {503} for run in runs)
        # The first may come at once; each one after waits for a turn at the pace (a
        # bound of half of what the 7 turns take).
        assert spent >= 7 / rate / 2, spent
        other = burst(server.port, request, 1, hosts=True)
        assert other.statuses() == {503} and other.of(503)[0] < 1 / rate / 2, other.outcomes


def test_an_open_loop_is_let_go_once_holding_its_refusals_is_seen_not_to_slow_it(
    tiny_repo_litert: Path,
) -> None:
    """A client that sends at its own rate whatever the answers take (an open loop:
    k6's arrival-rate executors, vegeta) is not slowed by held refusals: it opens more
    connections, and its 503s wait up to MAX_REFUSAL_WAIT_SECONDS. The pace's check
    lets them go once it has seen that (service.pace_check): their 503s come at once.
    Held, at three times the pace, they would wait ~2 s by the end; the bound is a
    quarter of that. The worker stops for 0.3 s midway (a VM's CPU taken away, a long
    collection): that is no end of the overload, and the loop stays let go (a gap of
    0.4 s had it held again, measured again and held to the end once in CI)."""
    rate = 300.0
    with full_worker(tiny_repo_litert, paced(rate)) as server:
        stall = threading.Timer(2.5, stopped, (server, 0.3))
        stall.start()
        try:
            run = open_loop(server.port, REQUEST, 3 * rate, 5.0)
        finally:
            stall.join()
        assert run.statuses() == {503}
        checks = "cnnserve_refusal_pace_checks_total"
        verdicts = [server.metric(checks, verdict=v) for v in ("open_loop", "closed_loop")]
        assert verdicts == [1, 0], verdicts
        late = [o.seconds for o in run.outcomes if o.sent >= 4.0]
        assert quantile(late, 0.5) < MAX_REFUSAL_WAIT_SECONDS / 4, (quantile(late, 0.5), run.opened)


def stopped(server: Server, seconds: float) -> None:
    """The server's process stopped (SIGSTOP) for ``seconds``."""
    server.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        server.process.send_signal(signal.SIGCONT)


def test_clients_retrying_at_once_are_held_again_once_let_go_shows_them_spinning(
    tiny_repo_litert: Path,
) -> None:
    """Clients that resend at once as each 503 comes (a closed loop: wrk, a retry loop)
    are held by the pace. Once their wait passes the check's threshold they are let go
    for a window or two, come back faster than twice the rate held, and are held again:
    no open-loop verdict, nothing let go at the end."""
    rate = 300.0
    with full_worker(tiny_repo_litert, paced(rate)) as server:
        run = load(server.port, REQUEST, 150, 4.0)
        assert run.statuses() == {503}
        checks = "cnnserve_refusal_pace_checks_total"
        assert server.metric(checks, verdict="closed_loop") >= 1
        assert server.metric(checks, verdict="open_loop") == 0
        assert server.metric("cnnserve_refusal_pace_let_go") == 0


def test_clients_reconnecting_at_once_are_not_let_go_as_an_open_loop(
    tiny_repo_litert: Path,
) -> None:
    """Clients opening a connection per request and resending at once after each 503
    (``Connection: close``) are a closed loop whose rate, let go, is bounded by the
    worker's accepts: their retries judged by their host past its bound (answered at
    once already) made them look like an open loop, and they were let go (7-23 served a
    second against 213-307, an outside audit). Never judged an open loop."""
    rate = 300.0
    request = post("/v1/classify", PNG, "image/png", {"Connection": "close"})
    with full_worker(tiny_repo_litert, paced(rate)) as server:
        run = load(server.port, request, 128, 4.0)
        assert run.statuses() == {503}
        assert server.metric("cnnserve_refusal_pace_checks_total", verdict="open_loop") == 0


def test_a_reconnect_is_timed_from_when_the_kernel_had_it(tiny_repo_litert: Path) -> None:
    """A client's reconnect after its 503, sent at once, that waited in the accept queue
    longer than the retry window (the worker stopped meanwhile, SIGSTOP) is still a
    retry at once: timed from when it was accepted, it looked late, and an outside
    audit's crowd of such clients, each from an address of its own, went unpaced (one
    worker, 8x: 55-59% goodput against 92-97% from one address)."""
    rate = 10.0  # paced(): a retry within 0.5 s counts as at once
    request = post("/v1/classify", PNG, "image/png", {"Connection": "close"})
    client = ("127.0.0.77", 0)  # an address no other request of this test comes from

    def refused_from_client() -> float:
        """Seconds from the request to its 503."""
        with socket.create_connection(
            ("127.0.0.1", server.port), 30, source_address=client
        ) as sock:
            began = time.perf_counter()
            sock.sendall(request)
            assert read_response(sock)[0].startswith(b"HTTP/1.1 503")
            return time.perf_counter() - began

    with full_worker(tiny_repo_litert, paced(rate)) as server:
        # Other clients' first 503s, answered at once, owe the pace a second's turns.
        assert burst(server.port, REQUEST, 12, hosts=True).statuses() == {503}
        refused_from_client()  # its first: at once, owing a turn too
        server.process.send_signal(signal.SIGSTOP)
        try:  # its reconnect, sent at once, waits in the queue past the window
            reconnect = concurrent.futures.ThreadPoolExecutor(1).submit(refused_from_client)
            time.sleep(0.7)  # the stimulus, not a synchronization: time in the queue
        finally:
            server.process.send_signal(signal.SIGCONT)
        # A retry: it waits for its turn (~0.4 s: the debt less what 0.7 s paid back);
        # timed from its accept, it was answered at once.
        assert reconnect.result(timeout=30) >= 0.7 + 0.1


def test_a_retry_on_a_kept_connection_is_timed_from_when_the_kernel_had_it(
    tiny_repo_litert: Path,
) -> None:
    """A client's retry on its connection, sent at once after its 503, that the worker
    read late (its event loop busy; here stopped, SIGSTOP) is still a retry at once.
    Timed from when the worker read them, the retries of 512 of wrk's connections
    refused at once came 10 ms or more after their 503s (the loop took 22-30 ms a turn),
    were not known as retries, and spun unpaced to the end: one worker served 50-70 a
    second against ~850 (1 run in 4)."""
    rate = 10.0  # paced(): a retry within 0.5 s counts as at once
    with (
        full_worker(tiny_repo_litert, paced(rate)) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock,
    ):
        # Other clients' first 503s, answered at once, owe the pace a second's turns.
        assert burst(server.port, REQUEST, 12, hosts=True).statuses() == {503}
        sock.sendall(REQUEST)
        assert read_response(sock)[0].startswith(b"HTTP/1.1 503")  # its first: at once
        server.process.send_signal(signal.SIGSTOP)
        try:  # its retry, sent at once, lies unread past the window
            began = time.perf_counter()
            sock.sendall(REQUEST)
            time.sleep(0.7)  # the stimulus, not a synchronization: time unread
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert read_response(sock)[0].startswith(b"HTTP/1.1 503")
        # A retry: it waits for its turn (~0.3 s: the debt less what 0.7 s paid back);
        # timed from when it was read, it was answered at once.
        assert time.perf_counter() - began >= 0.7 + 0.1


def test_an_open_loop_a_few_times_past_what_the_worker_serves_is_never_held(
    tiny_repo_litert: Path,
) -> None:
    """An overload's refusals are answered at once first, and stay so while they number
    no more than eight for each image answered (service.pace_check's probe): an open
    loop at a few times what the worker serves is never held, so it opens no crowd of
    connections, and nothing needs measuring. Held first (until 12-07), such a loop was
    measured held before it was let go: one worker of the default model at 4x, 3,600-3,800
    connections opened in 10 s, 503 p90 1.1-1.3 s, 64-66% of capacity served; never held,
    580-660 connections, 9 ms and 67-71%."""
    rate = 300.0
    with running_server(tiny_repo_litert, grpc_port=0, env=paced(rate, places=2)) as server:
        run = open_loop(server.port, REQUEST, 4 * rate, 4.0)
        served = len(run.of(200))
        assert run.statuses() == {200, 503} and served > len(run.of(503)) / 8, run.statuses()
        checks = "cnnserve_refusal_pace_checks_total"
        verdicts = [server.metric(checks, verdict=v) for v in ("many_refusals", "open_loop")]
        assert verdicts == [0, 0], verdicts
        refused = [o.seconds for o in run.outcomes if o.status == 503]
        # Held, they would wait up to MAX_REFUSAL_WAIT_SECONDS (2 s).
        assert quantile(refused, 0.9) < MAX_REFUSAL_WAIT_SECONDS / 4, quantile(refused, 0.9)


def test_a_few_clients_retrying_at_once_are_held_though_few_beside_the_answers(
    tiny_repo_litert: Path,
) -> None:
    """Two clients retrying at once beyond the worker's four places are too few to
    outnumber its answers eight to one, and are let go first; the probe's slowed window
    (each retry's 503 20 ms later) finds them waiting for their 503s, and the pace holds
    them. Let go, they were refused ~2,300 a second here (6,951 in 3 s), and wrk at 44
    connections on one worker of the default model was served ~20% less."""
    rate = 300.0
    with running_server(tiny_repo_litert, grpc_port=0, env=paced(rate, places=4)) as server:
        run = load(server.port, REQUEST, 6, 3.0)
        assert run.statuses() == {200, 503}
        checks = "cnnserve_refusal_pace_checks_total"
        verdicts = [server.metric(checks, verdict=v) for v in ("closed_loop", "many_refusals")]
        assert sum(verdicts) >= 1 and server.metric(checks, verdict="open_loop") == 0
        # Held at the pace after a moment let go (~1,400 here), not spinning for 3 s.
        assert len(run.of(503)) < 3 * rate * 3.0, (len(run.of(503)), verdicts)


def test_a_reconnect_landing_on_another_worker_is_paced_as_a_retry_there(
    tiny_repo_litert: Path,
) -> None:
    """With 2 workers a client's reconnect after its 503 most often lands on the other
    worker, which knew nothing of the refusal and answered it at once, unpaced: an
    outside audit's crowd of 256 HTTP/1.0 clients, each on an address of its own, was
    refused ~1,600 times a second (the pace ~1,000) and 772-930 of them served a second
    against 985-1,036 from one address. The workers share the addresses they refused:
    the other worker paces it as a retry."""
    rate = 5.0  # a turn (0.2 s) well under HOST_WAIT_SECONDS, past which none waits
    env = {**paced(rate), "CNNSERVE_WORKERS": "2", "CNNSERVE_ADMIT_AT": "headers"}
    head = REQUEST.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    client = ("127.0.0.78", 0)  # addresses no other request of this test comes from
    other = ("127.0.0.79", 0)

    def refused(sock: socket.socket) -> float:
        """Seconds from the request to its 503."""
        began = time.perf_counter()
        sock.sendall(REQUEST)
        answer = read_response(sock)[0]
        assert answer.startswith(b"HTTP/1.1 503"), answer
        return time.perf_counter() - began

    with running_server(tiny_repo_litert, env=env) as server:
        eventually(lambda: len(workers_of(server)) == 2)
        first, second = sorted(workers_of(server))
        held = [_connection_to(server, pid) for pid in (first, second)]
        try:
            for holder, pid in zip(held, (first, second), strict=True):
                holder.sendall(head)  # holds the worker's one place

                def full(pid: int = pid) -> bool:
                    with _connection_to(server, pid) as sock:
                        sock.sendall(REQUEST)
                        return read_response(sock)[0].startswith(b"HTTP/1.1 503")

                eventually(full, timeout=60)
            # Opened first: finding a worker's connection takes the kernel's time.
            on_first = _connection_to(server, first, client)
            other_on_second = _connection_to(server, second, other)
            again_on_second = _connection_to(server, second, client)
            with on_first, other_on_second, again_on_second:
                refused(other_on_second)  # another address's first: its token spent
                refused(on_first)  # the client's first 503, from the first worker
                # Its reconnect, sent at once, to the second worker: a retry, waiting
                # for that worker's next turn (0.2 s; unshared, it came at once).
                assert refused(again_on_second) >= 1 / rate / 2
        finally:
            for holder in held:
                holder.close()


def _connection_to(
    server: Server, pid: int, source: tuple[str, int] = ("127.0.0.1", 0)
) -> socket.socket:
    """A connection from ``source`` that the worker ``pid`` accepted (the kernel picks
    the worker: opened until that one does)."""
    workers = workers_of(server)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        sock = socket.create_connection(("127.0.0.1", server.port), 30, source_address=source)
        eventually(lambda: accepted_by(workers, sock), timeout=30)  # noqa: B023
        if accepted_by({pid}, sock):
            return sock
        sock.close()
    raise TimeoutError(f"no connection accepted by worker {pid}")


def test_a_503_the_app_makes_is_paced_by_its_connection_too(tiny_repo_litert: Path) -> None:
    """A request pipelined behind another on its connection is refused by RequestGuard,
    not by the HTTP protocol (an answer must not overtake the one before it): with the
    refusal bucket deep in debt its 503 still comes at once, and the one after it on
    the same connection, retried at once, waits for the pace."""
    with (
        full_worker(tiny_repo_litert, paced(rate=4.0)) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as client,
    ):
        # Refusals not waiting (clients of their own): their tokens owed, up to a
        # second's worth (the cap).
        assert burst(server.port, REQUEST, 12, hosts=True).statuses() == {503}
        times = []
        rest = b""
        for _ in range(2):
            began = time.perf_counter()
            client.sendall(PROBE + REQUEST)  # the classify waits behind the probe: the app's
            head, _, rest = read_response(client, rest)
            assert head.startswith(b"HTTP/1.1 200"), head
            head, body, rest = read_response(client, rest)
            times.append(time.perf_counter() - began)
            assert head.startswith(b"HTTP/1.1 503"), head
            assert json.loads(body)["error"]["code"] == "overloaded"
        # The first: not a retry, answered at once although paced it would wait for the
        # second owed. The second came at once after it: it waits for the pace.
        owed = MAX_REFUSAL_DEBT_SECONDS
        assert times[0] < owed / 2 < owed <= times[1], times


def test_grpc_refusals_are_paced_by_connection_too(tiny_repo_litert: Path) -> None:
    """The same over gRPC, where a connection is a channel (``context.peer()``): each
    channel's first RESOURCE_EXHAUSTED comes at once with the refusal bucket spent, a
    channel retrying at once waits its turn, and more refused calls wait than the
    worker has places without gRPC's own cap refusing them (or a health check)."""
    # Fast enough that the bound on the middle retry, (half - 1) / rate = 1.125 s, stays
    # under MAX_REFUSAL_WAIT_SECONDS (2 s): behind the first answers' owed tokens the
    # later retries reach that cap, which still waits longer than the bound.
    rate = 8.0
    places = 16  # gRPC's own cap (call_cap) is far above the 20 calls
    channels = 20
    times: list[list[float]] = [[], []]

    def client(channel: grpc.Channel) -> None:
        stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)  # type: ignore[no-untyped-call]
        for answered in times:
            began = time.perf_counter()
            with pytest.raises(grpc.RpcError) as shed:
                stub.Classify(cnnserve_v1_pb2.ClassifyRequest(image=PNG), timeout=30)
            answered.append(time.perf_counter() - began)
            assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    with full_worker(tiny_repo_litert, paced(rate, places), places) as server:
        # A connection each (channels to one target share one by default).
        own = [("grpc.use_local_subchannel_pool", 1)]
        opened = [grpc.insecure_channel(server.grpc_target, options=own) for _ in range(channels)]
        try:
            for channel in opened:  # connected before the burst
                grpc.channel_ready_future(channel).result(timeout=30)
            threads = [threading.Thread(target=client, args=(c,)) for c in opened]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
        finally:
            for channel in opened:
                channel.close()
    first, retried = sorted(times[0]), sorted(times[1])
    assert len(first) == len(retried) == channels, times
    assert first[-1] < (channels - 1) / rate / 2, first
    half = channels // 2
    assert retried[half] >= (half - 1) / rate, retried


def test_grpc_retries_of_an_overload_wait_the_time_its_refusal_says(
    tiny_repo_litert: Path,
) -> None:
    """A client whose retry policy retries RESOURCE_EXHAUSTED (a service config, as
    docs/serving.md shows): the refusal says when to come back in what gRPC's retries
    read (grpc-retry-pushback-ms, the retry-after's second), and the second attempt
    comes that long after the first, not after the policy's 50 ms backoff."""
    policy = {
        "methodConfig": [
            {
                "name": [{"service": "cnnserve.v1.ImageClassifier"}],
                "retryPolicy": {
                    "maxAttempts": 2,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.05s",
                    "backoffMultiplier": 1,
                    "retryableStatusCodes": ["RESOURCE_EXHAUSTED"],
                },
            }
        ]
    }
    # A fast pace: neither attempt waits for its turn (the retry is not at once anyway).
    with full_worker(tiny_repo_litert, paced(1000.0)) as server:
        before = sum(shed_counts(server).values())
        options = [("grpc.service_config", json.dumps(policy))]
        with grpc.insecure_channel(server.grpc_target, options=options) as channel:
            stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)  # type: ignore[no-untyped-call]
            began = time.perf_counter()
            with pytest.raises(grpc.RpcError) as shed:
                stub.Classify(cnnserve_v1_pb2.ClassifyRequest(image=PNG), timeout=30)
            took = time.perf_counter() - began
        assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(shed.value.trailing_metadata() or ())
        assert trailers["retry-after"] == "1"
        assert trailers["grpc-retry-pushback-ms"] == "1000"
        assert took >= 0.9, f"the retry came {took:.3f} s after the call began"
        assert sum(shed_counts(server).values()) - before == 2  # both attempts refused


def test_a_grpc_connection_holds_its_streams_at_most_and_keeps_the_rest_itself(
    tiny_repo_litert: Path,
) -> None:
    """CNNSERVE_GRPC_MAX_CONCURRENT_STREAMS bounds what one gRPC connection holds at a
    worker: its client keeps the calls beyond it (they wait there, not in the server's
    queue ahead of other clients' calls: a client spinning 128 calls on one connection
    held a polite client's call 100-330 ms), sends one as soon as one of its calls ends,
    and calls within the limit are never reset however fast they come and go (gRPC's
    default counting reset some REFUSED_STREAM: UNAVAILABLE to the client)."""
    streams = 2
    env = {"CNNSERVE_POLL_SECONDS": "0", "CNNSERVE_GRPC_MAX_CONCURRENT_STREAMS": str(streams)}
    check = health_pb2.HealthCheckRequest(service="")
    serving = health_pb2.HealthCheckResponse.SERVING
    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection each
    with (
        running_server(tiny_repo_litert, grpc_port=0, env=env) as server,
        grpc.insecure_channel(server.grpc_target, options=own) as busy,
        grpc.insecure_channel(server.grpc_target, options=own) as other,
    ):
        health = health_pb2_grpc.HealthStub(busy)  # type: ignore[no-untyped-call]
        watches = [health.Watch(check, timeout=60) for _ in range(streams)]
        try:
            for watch in watches:
                assert next(watch).status == serving  # each holds one of the streams
            with pytest.raises(grpc.RpcError) as waited:
                health.Check(check, timeout=1)
            assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            other_health = health_pb2_grpc.HealthStub(other)  # type: ignore[no-untyped-call]
            assert other_health.Check(check, timeout=5).status == serving
            queued = health.Check.future(check, timeout=30)
            watches.pop().cancel()
            assert queued.result().status == serving
        finally:
            for watch in watches:
                watch.cancel()

        # Calls ending and starting back to back on one connection, more kept in flight
        # than it may hold: every one answered.
        codes: Counter[grpc.StatusCode] = Counter()
        in_flight: deque[grpc.Future] = deque()

        def settle(call: grpc.Future) -> None:
            try:
                call.result()
                codes[grpc.StatusCode.OK] += 1
            except grpc.RpcError as error:
                codes[error.code()] += 1

        stub = health_pb2_grpc.HealthStub(busy)  # type: ignore[no-untyped-call]
        for _ in range(1500):
            if len(in_flight) >= 16:
                settle(in_flight.popleft())
            in_flight.append(stub.Check.future(check, timeout=30))
        while in_flight:
            settle(in_flight.popleft())
    assert codes == {grpc.StatusCode.OK: 1500}, codes


def test_a_request_refused_at_its_headers_is_answered_like_any_refusal_and_the_connection_goes_on(
    tiny_repo_litert: Path,
) -> None:
    """Refused as soon as its headers are parsed (service.api.http_protocol), a request
    gets RequestGuard's answer: 503, Retry-After, its own X-Request-ID, the JSON error;
    its body is dropped and the same connection serves the next request; a pipelined
    request after a refused one is answered after it, in order."""
    env = {"CNNSERVE_POLL_SECONDS": "0", "CNNSERVE_MAX_CONCURRENT_REQUESTS": "1"}
    request = post("/v1/classify", PNG, "image/png", {"X-Request-ID": "refused-1"})
    probe = PROBE
    with (
        full_worker(tiny_repo_litert, env) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as client,
    ):
        shed_before = shed_counts(server).get("concurrency", 0)

        client.sendall(request)
        head, body, rest = read_response(client)
        assert head.startswith(b"HTTP/1.1 503"), head
        assert b"retry-after: 1" in head.lower() and b"x-request-id: refused-1" in head.lower()
        assert b"content-type: application/json" in head.lower()
        error = json.loads(body)["error"]
        assert error["code"] == "overloaded" and "its limit" in error["message"]

        client.sendall(probe)  # the same connection, after the dropped body
        head, _, rest = read_response(client, rest)
        assert head.startswith(b"HTTP/1.1 200"), head

        client.sendall(request + probe)  # pipelined: the refusal first, then the probe
        first, _, rest = read_response(client, rest)
        second, _, rest = read_response(client, rest)
        assert first.startswith(b"HTTP/1.1 503") and second.startswith(b"HTTP/1.1 200")

        # HEAD, refused the same way, gets the head alone: the next answer still parses.
        client.sendall(b"HEAD /v1/classify HTTP/1.1\r\nHost: x\r\n\r\n" + probe)
        first, body, rest = read_response(client, rest, head_request=True)
        second, _, _ = read_response(client, rest)
        assert first.startswith(b"HTTP/1.1 503") and body == b"", first
        assert second.startswith(b"HTTP/1.1 200"), second
        assert shed_counts(server).get("concurrency", 0) >= shed_before + 3
        text = httpx.get(server.url + "/metrics", timeout=10).text  # counted by its route
        assert re.search(r'cnnserve_requests_total\{code="503"[^}]*route="/v1/classify"', text)


def test_a_refusal_to_a_client_closing_its_connection_is_read_whole_not_reset(
    tiny_repo_litert: Path,
) -> None:
    """A client that sends ``Connection: close`` (urllib does, on every request) and is
    refused as its headers are parsed gets the whole 503 and then the end of the
    connection: the server reads its body before closing. Closed with the body unread,
    the kernel reset the connection and the client saw no 503 at all."""
    env = {"CNNSERVE_POLL_SECONDS": "0", "CNNSERVE_MAX_CONCURRENT_REQUESTS": "1"}
    body = bytes(4 << 20)  # refused at its headers: never decoded
    head = (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with full_worker(tiny_repo_litert, env) as server:
        for body_later in (True, False):
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
                if body_later:  # the 503 comes first, then the client sends its body
                    client.sendall(head)
                    answer, _, rest = read_response(client)
                    client.sendall(body)
                else:  # all at once: the server refuses with most of it unread
                    sender = threading.Thread(target=client.sendall, args=(head + body,))
                    sender.start()
                    answer, _, rest = read_response(client)
                    sender.join(timeout=30)
                assert answer.startswith(b"HTTP/1.1 503"), answer
                assert b"connection: close" in answer.lower()
                while part := client.recv(65536):  # a reset would raise here
                    rest += part
                assert rest == b""


def _refused_or_served(port: int, *, body_later: bool = False) -> tuple[bytes, bytes]:
    """REQUEST on a new connection: (the answer's head, what followed on the connection
    until the server closed it, or b"open" if it stayed open). ``body_later``: send the
    headers, and the body only once a refusal at the headers has come (b"" if none came
    in 2 s: the request holds a place on a worker with room)."""
    head, _, body = REQUEST.partition(b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        if body_later:
            sock.sendall(head + b"\r\n\r\n")
            sock.settimeout(2.0)
            try:
                early = sock.recv(65536)
            except TimeoutError:
                return b"", b"open"
            sock.settimeout(30)
            sock.sendall(body)  # after the 503: closing with it unread would reset
            answer, _, rest = read_response(sock, early)
        else:
            sock.sendall(REQUEST)
            answer, _, rest = read_response(sock)
        if b"connection: close" not in answer.lower():
            return answer, b"open"
        while part := sock.recv(65536):  # a reset here would raise
            rest += part
        return answer, rest


def test_a_worker_at_its_limit_sends_refused_clients_to_a_sibling_with_room(
    tiny_repo_litert: Path,
) -> None:
    """The kernel splits connections between workers as they are accepted, and keep-alive
    holds them there: a client that opened its connections at once could find one worker
    refusing while the other had room. A refusal while a sibling has room closes the
    connection after the 503 (read whole, never reset, even when the body comes after
    the refusal) so that the client's next connection may land on the sibling; once
    every worker is full, refusals keep the connection."""
    env = {
        "CNNSERVE_WORKERS": "2",
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_MAX_CONCURRENT_REQUESTS": "1",
        "CNNSERVE_MAX_REFUSALS_PER_SECOND": "0",
        "CNNSERVE_ADMIT_AT": "headers",  # a request whose body has not come holds its place
        "CNNSERVE_BODY_READ_TIMEOUT_SECONDS": "300",  # and holds it for the whole test
    }
    head = REQUEST.partition(b"\r\n\r\n")[0]
    holders: list[socket.socket] = []
    with running_server(tiny_repo_litert, env=env) as server:
        try:
            holders.append(socket.create_connection(("127.0.0.1", server.port)))
            holders[0].sendall(head + b"\r\n\r\n")  # holds a place on one worker
            moved: list[tuple[bytes, bytes]] = []

            def refused_on_the_full_worker(body_later: bool) -> bool:
                answer, after = _refused_or_served(server.port, body_later=body_later)
                if answer.startswith(b"HTTP/1.1 503"):
                    moved.append((answer, after))
                    return True
                # It landed on the other worker (b"": held there, its body never sent).
                assert answer == b"" or answer.startswith(b"HTTP/1.1 200"), answer
                return False

            eventually(lambda: refused_on_the_full_worker(False), timeout=60)
            eventually(lambda: refused_on_the_full_worker(True), timeout=60)
            for answer, after in moved:
                assert b"connection: close" in answer.lower(), answer
                assert b"retry-after: 1" in answer.lower()
                assert after == b"", after  # closed after the whole 503: nothing else

            def both_full() -> bool:
                # Another holder lands on either worker: on the free one it holds it.
                holder = socket.create_connection(("127.0.0.1", server.port))
                holder.sendall(head + b"\r\n\r\n")
                holders.append(holder)
                answer, after = _refused_or_served(server.port)
                return after == b"open" and answer.startswith(b"HTTP/1.1 503")

            eventually(both_full, timeout=60)
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                for _ in range(2):  # no room anywhere: the refusal keeps the connection
                    sock.sendall(REQUEST)
                    answer, _, _ = read_response(sock)
                    assert answer.startswith(b"HTTP/1.1 503")
                    assert b"connection: close" not in answer.lower()
            metrics = httpx.get(server.url + "/metrics", timeout=10).text
            assert re.search(r"^cnnserve_concurrency_moved_connections_total [1-9]", metrics, re.M)
        finally:
            for holder in holders:
                holder.close()


def _two_on_one_worker(server: Server) -> tuple[socket.socket, socket.socket]:
    """Two connections the same worker accepted (the kernel's choice: opened until two
    share one), once the other worker accepted one too (it listens: its startup is over
    and its siblings see it serve); the others closed."""
    workers = workers_of(server)
    assert len(workers) == 2, workers
    opened: list[socket.socket] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            opened.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
            owners = {pid: [s for s in opened if accepted_by({pid}, s)] for pid in workers}
            for pid, mine in owners.items():
                others = [s for other, theirs in owners.items() if other != pid for s in theirs]
                if len(mine) >= 2 and others:
                    first, second = mine[:2]
                    opened.remove(first)
                    opened.remove(second)
                    return first, second
        raise TimeoutError("no two connections on one worker with the other listening")
    finally:
        for sock in opened:
            sock.close()


MOVE_ENV = {
    "CNNSERVE_WORKERS": "2",
    "CNNSERVE_POLL_SECONDS": "0",
    # A request takes its place as its headers are parsed: one whose body is not sent
    # yet holds the worker's second place for as long as the test needs.
    "CNNSERVE_ADMIT_AT": "headers",
}


def _head_and_body(request: bytes) -> tuple[bytes, bytes]:
    head, _, body = request.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", body


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(multipart([encode(gradient(), "JPEG")] * 4), id="multipart-via-app"),
        pytest.param(REQUEST, id="raw-image-direct"),
    ],
)
def test_a_busy_worker_moves_an_answered_connection_to_an_idle_sibling(
    tiny_repo_litert: Path, request_bytes: bytes
) -> None:
    """Keep-alive holds a connection on the worker that accepted it: 4 connections split
    0/4 had one worker answer them all while the other idled. A worker answering a
    request while it holds another and a sibling holds none closes the answered
    connection after its 200 (once a second at most), so that the client's next
    connection may land on the idle sibling; the other connection goes on."""
    with running_server(tiny_repo_litert, env=MOVE_ENV) as server:
        eventually(lambda: len(workers_of(server)) == 2)
        moved, kept = _two_on_one_worker(server)
        with moved, kept:
            head, body = _head_and_body(request_bytes)
            kept.sendall(head)  # holds a place: the worker holds two with the next
            moved.sendall(request_bytes)
            answer = read_response(moved)[0]
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert b"connection: close" in answer.lower(), answer
            assert moved.recv(65536) == b""  # closed after its whole answer
            kept.sendall(body)
            answer = read_response(kept)[0]  # the only one it holds: not moved
            assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" not in answer
            kept.sendall(request_bytes)  # and the connection goes on
            assert read_response(kept)[0].startswith(b"HTTP/1.1 200")
        assert server.metric("cnnserve_concurrency_moved_connections_total") == 1


def test_a_connection_with_a_request_pipelined_behind_the_answer_is_not_moved(
    tiny_repo_litert: Path,
) -> None:
    """Closing after an answer with another request behind it on the connection would
    drop that request (and, its body unread, reset the connection, the answer lost with
    it): the connection is moved after the last one instead."""
    with running_server(tiny_repo_litert, env=MOVE_ENV) as server:
        eventually(lambda: len(workers_of(server)) == 2)
        client, holder = _two_on_one_worker(server)
        with client, holder:
            head, body = _head_and_body(REQUEST)
            holder.sendall(head)
            client.sendall(REQUEST + REQUEST)  # pipelined
            first, _, after = read_response(client)
            second = read_response(client, after)[0]
            assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first
            assert second.startswith(b"HTTP/1.1 200") and b"connection: close" in second
            holder.sendall(body)
            assert read_response(holder)[0].startswith(b"HTTP/1.1 200")
        assert server.metric("cnnserve_concurrency_moved_connections_total") == 1


def test_four_times_grpc_overload_is_shed_fast_and_recovers(
    tiny_repo_litert: Path, tmp_path: Path
) -> None:
    """The same over gRPC, with the bench's own clients (service.bench.grpc_load): 4x
    the calls the worker admits kept in flight over several connections, retrying
    RESOURCE_EXHAUSTED at once, and a polite client on a connection of its own. Its calls
    reach admission at once rather than wait in gRPC's core behind every other
    connection's: with one gRPC listener a worker (grpc.aio takes one call a turn of the
    event loop) its median call took ~85 ms here and admission refused none of the
    load, against ~15-25 ms now.

    The calls carry a 640x480 PNG (3-5 ms of decoding each), so that 4x the calls is 4x
    the load for the server: with a 64x48 one the load's own Python process, on the same
    cores, barely sent more than the tiny model serves (0-142 refusals a run). Decoded on
    the event loop, as images of up to 500,000 pixels were, these calls waited in gRPC's
    core and none was refused (the polite client's p99 110-616 ms): the decode threads'
    backlog is what admission counts."""
    (tmp_path / "image.png").write_bytes(LARGE_PNG)
    bodies = (tmp_path / "image.png",)
    env = {
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_ACCESS_LOG": "false",
        "CNNSERVE_MAX_CONCURRENT_REQUESTS": str(BASE_CONNECTIONS),
    }
    with running_server(tiny_repo_litert, grpc_port=0, env=env) as server:
        target = server.grpc_target

        def polite_clients() -> list[GrpcClient]:  # as the bench's probe: two, pausing
            now = time.monotonic()
            return [GrpcClient(target, "tiny", None, [LARGE_PNG], 0.02, now) for _ in "ab"]

        def polite(seconds: float) -> list[Sample]:
            clients = polite_clients()
            with running(clients):
                time.sleep(seconds)
            return [sample for client in clients for sample in client.samples]

        def of(samples: list[Sample], status: int) -> list[float]:
            return [sample.ms / 1e3 for sample in samples if sample.status == status]

        run_load(target, "tiny", None, bodies, calls=BASE_CONNECTIONS, seconds=1.0)  # warm up
        unloaded = polite(2.0)
        assert {s.status for s in unloaded} == {200}
        unloaded_p99 = quantile(of(unloaded, 200), 0.99)
        capacity = run_load(target, "tiny", None, bodies, calls=BASE_CONNECTIONS, seconds=SECONDS)
        assert set(capacity["statuses"]) <= {"200", "503"}, capacity

        clients = polite_clients()
        with readiness_polled(server) as probes, running(clients):
            overload = run_load(
                target, "tiny", None, bodies, calls=4 * BASE_CONNECTIONS, seconds=SECONDS
            )
        after = polite(1.0)

    seen = [sample for client in clients for sample in client.samples]
    admitted, shed = of(seen, 200), of(seen, 503)
    report = (
        f"unloaded p99 {unloaded_p99 * 1e3:.1f} ms; capacity {capacity['requests_per_s']}/s; "
        f"overload: {overload['requests_per_s']}/s, statuses {overload['statuses']}; the polite "
        f"client's {len(admitted)} OK p50 {quantile(admitted, 0.5) * 1e3:.1f} p99 "
        f"{quantile(admitted, 0.99) * 1e3:.1f} ms, {len(shed)} RESOURCE_EXHAUSTED"
        + (f" p50 {quantile(shed, 0.5) * 1e3:.1f} ms" if shed else "")
        + f"; after: {Counter(s.status for s in after)}"
    )
    print(report)
    assert set(overload["statuses"]) <= {"200", "503"}, report
    assert {s.status for s in seen} <= {200, 503}, report
    # As over REST: the targets with room for a noisy machine (half the capacity, 100 ms
    # over the latency target).
    assert overload["requests_per_s"] >= 0.5 * capacity["requests_per_s"], report
    assert quantile(admitted, 0.99) <= 2 * unloaded_p99 + BUDGET + 0.1, report
    # Not queued where admission is blind: admission saw the load's excess and refused
    # some of it (with one listener, none: the calls waited in gRPC's core), and the
    # polite client's median call waited about what an admitted call waits for the
    # calls admitted before it (the limit at the capacity's rate), not for all 64.
    assert overload["statuses"].get("503", 0) > 0, report
    admitted_wait = BASE_CONNECTIONS / capacity["requests_per_s"]
    assert quantile(admitted, 0.5) <= quantile(of(unloaded, 200), 0.5) + 2 * admitted_wait, report
    if shed:
        assert quantile(shed, 0.5) <= 0.25, report
    assert probes and set(probes) == {200}, probes
    assert {s.status for s in after} == {200}, report
    assert quantile(of(after, 200), 0.5) <= 3 * quantile(of(unloaded, 200), 0.5) + 0.02, report


def test_connections_over_the_limit_get_a_json_503_and_probes_still_answer(
    tiny_repo: Path,
) -> None:
    """Past CNNSERVE_MAX_CONNECTIONS uvicorn answered every request a plain-text 503,
    uncounted, /healthz and /readyz too: a few thousand silent connections turned the
    liveness probe 503. And a limit of N served N - 1. Only a connection taken on over
    the limit is refused: one kept alive from before is served on (it was refused and
    closed along with the new ones)."""
    limit = 4
    env = {"CNNSERVE_MAX_CONNECTIONS": str(limit), "CNNSERVE_POLL_SECONDS": "0"}
    with running_server(tiny_repo, env=env) as server:
        held: list[socket.socket] = []
        try:
            for _ in range(limit - 1):  # each answered once: accepted by the worker
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(sock)[0].startswith(b"HTTP/1.1 200 ")
                held.append(sock)
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                sock.sendall(REQUEST)  # the limit's own connection: served
                assert read_response(sock)[0].startswith(b"HTTP/1.1 200 ")
                held.append(sock)  # open, the limit is reached: one more is over it
                with socket.create_connection(("127.0.0.1", server.port), timeout=30) as more:
                    for probe in (b"/healthz", b"/readyz"):
                        more.sendall(b"GET " + probe + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                        assert read_response(more)[0].startswith(b"HTTP/1.1 200 "), probe
                    sock.sendall(REQUEST)  # from before the worker went over: served
                    assert read_response(sock)[0].startswith(b"HTTP/1.1 200 ")
                    more.sendall(REQUEST)
                    head, body, _ = read_response(more)
                held.remove(sock)
            assert head.startswith(b"HTTP/1.1 503 "), head
            lower = head.lower()
            assert b"connection: close" in lower and b"retry-after: 1" in lower, head
            error = json.loads(body)["error"]
            assert error["code"] == "overloaded" and "CNNSERVE_MAX_CONNECTIONS" in error["message"]
        finally:
            for sock in held:
                sock.close()
        shed = server.metric("cnnserve_overload_rejections_total", model="", reason="connections")
        assert shed == 1
    assert "Exceeded concurrency limit" not in server.log.read_text()


def test_bodies_past_the_workers_budget_are_refused_at_their_headers(tiny_repo: Path) -> None:
    """Uploads that wait for a place were all held whole: ~900 concurrent 1.4 MB photos
    took a worker from 110 MB to 1.2 GB. Past CNNSERVE_MAX_BUFFERED_BODY_BYTES a request
    is refused at its headers (503, reason bodies), its body never held; a small one
    still fits, and the budget comes back once the held body is answered."""
    noise = np.random.default_rng(0).integers(0, 256, (420, 420, 3), dtype=np.uint8)
    big = encode(Image.fromarray(noise), "PNG")  # ~530 KB: two pass 1 MiB
    env = {"CNNSERVE_POLL_SECONDS": "0", "CNNSERVE_MAX_BUFFERED_BODY_BYTES": str(1 << 20)}
    with running_server(tiny_repo, env=env) as server, server.client() as client:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as held:
            head = post("/v1/classify", big, "image/png")[: -len(big)]
            held.sendall(head + big[:-1000])  # held by the worker, not answered

            def refused() -> bool:
                answer = client.post("/v1/classify", content=big, headers=PNG_TYPE)
                return answer.status_code == 503

            eventually(refused)  # once the worker holds the first body
            answer = client.post("/v1/classify", content=big, headers=PNG_TYPE)
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
            error = answer.json()["error"]
            assert error["code"] == "overloaded", error
            assert "CNNSERVE_MAX_BUFFERED_BODY_BYTES" in error["message"], error
            assert client.post("/v1/classify", content=PNG, headers=PNG_TYPE).status_code == 200
            held.sendall(big[-1000:])
            assert read_response(held)[0].startswith(b"HTTP/1.1 200 ")
        assert client.post("/v1/classify", content=big, headers=PNG_TYPE).status_code == 200
        assert shed_counts(server).get("bodies", 0) >= 2


def test_connections_the_worker_is_behind_on_are_refused_a_stall_is_not(
    tiny_repo: Path,
) -> None:
    """A new connection per request, faster than a worker takes them: they waited in the
    kernel's accept queue, where admission never looked, and were all answered 200
    seconds later (none refused, probes timing out, deadlines ignored). While new
    connections' first requests keep waiting over the queue-wait budget to be accepted
    (for BACKLOG_SECONDS), they are refused at once (503, reason backlog); one stall
    that a connection waited out is not refused; probes are answered. The worker is
    stopped (SIGSTOP) while each request arrives: its wait is real, in the kernel."""
    env = {"CNNSERVE_POLL_SECONDS": "0", "CNNSERVE_QUEUE_WAIT_BUDGET_SECONDS": "0.02"}

    def stalled(request: bytes, seconds: float) -> tuple[bytes, bytes]:
        server.process.send_signal(signal.SIGSTOP)
        try:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            sock.sendall(request)
            time.sleep(seconds)  # the stimulus, not a synchronization: time in the queue
        finally:
            server.process.send_signal(signal.SIGCONT)
        with sock:
            head, body, _ = read_response(sock)
        return head, body

    with running_server(tiny_repo, env=env) as server:
        kept = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        kept.sendall(REQUEST)
        assert read_response(kept)[0].startswith(b"HTTP/1.1 200 ")
        # One stall, one connection: it waited, but nothing says the worker is behind.
        assert stalled(REQUEST, 0.3)[0].startswith(b"HTTP/1.1 200 ")
        assert stalled(PROBE, 0.3)[0].startswith(b"HTTP/1.1 200 ")  # waited, a probe
        # A backlog: connection after connection, each waiting over the budget (40 ms
        # against 20), one every ~50 ms, for longer than BACKLOG_SECONDS.
        answers = [stalled(REQUEST, 0.04) for _ in range(12)]
        said = [json.loads(body)["error"]["message"] for head, body in answers if b" 503 " in head]
        assert all(head.split()[1] in (b"200", b"503") for head, _ in answers), answers
        backlog = [message for message in said if "waited" in message]
        assert backlog and "as others before it" in backlog[0], said
        assert stalled(PROBE, 0.04)[0].startswith(b"HTTP/1.1 200 ")  # probes: answered
        kept.sendall(REQUEST)  # not a new connection: its wait was its own
        assert read_response(kept)[0].startswith(b"HTTP/1.1 200 ")
        kept.close()
        assert shed_counts(server).get("backlog") == len(backlog)


def test_a_deadline_counts_from_when_the_kernel_had_the_request(tiny_repo: Path) -> None:
    """X-Request-Timeout: 0.2 on a new connection that waited longer than that to be
    accepted was run and answered 200: its deadline counted from when the gateway first
    read it. Now from when the kernel had it, raw image and multipart alike."""
    env = {"CNNSERVE_POLL_SECONDS": "0", "CNNSERVE_QUEUE_WAIT_BUDGET_SECONDS": "5"}
    timeout = {"X-Request-Timeout": "0.2"}
    form = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + PNG + b"\r\n--b--\r\n"
    )
    sent = [
        post("/v1/classify", PNG, "image/png", timeout),
        post("/v1/classify", form, "multipart/form-data; boundary=b", timeout),
    ]
    with running_server(tiny_repo, env=env) as server:
        server.process.send_signal(signal.SIGSTOP)
        try:
            socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in sent]
            for sock, request in zip(socks, sent, strict=True):
                sock.sendall(request)
            time.sleep(0.4)  # the stimulus, not a synchronization: time in the queue
        finally:
            server.process.send_signal(signal.SIGCONT)
        for sock in socks:
            head, body, _ = read_response(sock)
            sock.close()
            assert head.startswith(b"HTTP/1.1 504 "), head
            assert json.loads(body)["error"]["code"] == "deadline_exceeded"


def test_a_body_declared_past_the_limit_holds_no_more_than_the_limit(tiny_repo: Path) -> None:
    """A Content-Length of 10**12 (answered 413) counted whole as held until its
    connection closed: every other upload refused as over the body budget meanwhile."""
    noise = np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    photo = encode(Image.fromarray(noise), "PNG")  # ~270 KB
    env = {
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_MAX_BUFFERED_BODY_BYTES": str(4 << 20),
        "CNNSERVE_MAX_BODY_BYTES": str(1 << 20),
    }
    with running_server(tiny_repo, env=env) as server, server.client() as client:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as huge:
            huge.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 1000000000000\r\n\r\n" + PNG
            )
            assert read_response(huge)[0].startswith(b"HTTP/1.1 413 ")
            answer = client.post("/v1/classify", content=photo, headers=PNG_TYPE)
            assert answer.status_code == 200, answer.text
        assert shed_counts(server).get("bodies", 0) == 0
