"""CNNSERVE_PROBE_PORT: a port of its own for the probes and the metrics scrape, served
by the same workers. A kubelet's probe opens a new connection each time; on the REST
port it waits in the accept queue behind every connection queued there, and under an
open loop at 4x one worker's capacity that took 0.5-4 s (the bench's readiness polls,
1 s timeout, failed for 8 s)."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from service.bench.open_loop import run_load
from service.bench.photos import photo_mix
from service.bench.wrk import write_bodies
from service.launch import free_port
from tests.helpers.errors import error_of
from tests.helpers.images import encode, gradient
from tests.helpers.load import post
from tests.helpers.server import ROOT, Server, eventually, running_server

pytestmark = pytest.mark.reliability

KEY = "probe-port-key-0123456789"
PNG = encode(gradient(), "PNG")
REQUEST = post("/v1/classify", PNG, "image/png", {"Authorization": f"Bearer {KEY}"})
PROBE_TIMEOUT = 1.0  # a kubelet probe's default


def fresh_get(port: int, path: str, method: str = "GET") -> tuple[int, float]:
    """``path`` on a new connection, as a kubelet probes: (status, seconds); status 0
    when nothing came within PROBE_TIMEOUT."""
    began = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        response.read()
        return response.status, time.perf_counter() - began
    except OSError:
        return 0, time.perf_counter() - began
    finally:
        connection.close()


@contextmanager
def probed(server: Server, port: int) -> Iterator[list[tuple[int, float]]]:
    """/readyz polled on a new connection to ``port`` every 0.1 s while the block runs."""
    answers: list[tuple[int, float]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.1):
            answers.append(fresh_get(port, "/readyz"))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        yield answers
    finally:
        stop.set()
        poller.join()


@pytest.fixture(scope="module")
def keyed(tiny_repo_litert: Path) -> Iterator[tuple[Server, int]]:
    probe_port = free_port()
    env = {
        "CNNSERVE_API_KEYS": KEY,
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_PROBE_PORT": str(probe_port),
        "CNNSERVE_MAX_CONNECTIONS": "4",
    }
    with running_server(tiny_repo_litert, env=env) as server:
        yield server, probe_port


@contextmanager
def kept_open(port: int, count: int) -> Iterator[None]:
    """``count`` keep-alive connections to ``port``, each answered once (so accepted),
    idle while the block runs."""
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(count)]
    try:
        for connection in connections:
            connection.request("GET", "/healthz")
            connection.getresponse().read()
        yield
    finally:
        for connection in connections:
            connection.close()


def test_the_probe_port_answers_the_probes_and_the_scrape_and_nothing_else(
    keyed: tuple[Server, int],
) -> None:
    """Probes and the metrics scrape need no key there, as on the REST port; any other
    request is a 404 that names the port, before its key is asked for (an API request
    sent to the wrong port, not a refused key)."""
    server, probe_port = keyed
    probes = httpx.Client(base_url=f"http://127.0.0.1:{probe_port}", timeout=10)
    with probes, server.client(headers={"Authorization": f"Bearer {KEY}"}) as rest:
        assert probes.get("/readyz").json() == {"ready": True}
        assert probes.get("/healthz").status_code == 200
        assert probes.head("/readyz").status_code == 200
        assert "cnnserve_requests_total" in probes.get("/metrics").text
        off = [("POST", "/v1/classify"), ("GET", "/docs"), ("GET", "/"), ("POST", "/readyz")]
        for method, path in off:
            for headers in ({}, {"Authorization": f"Bearer {KEY}"}):
                answer = probes.request(method, path, headers=headers, content=PNG)
                assert answer.status_code == 404, (method, path, answer.text)
                code, message = error_of(answer)
                assert code == "not_found" and f"port {probe_port} serves" in message
                assert "/readyz" in message and "REST port" in message
        # The REST port is as it was: the API, its key, the probes.
        classified = rest.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
        assert classified.status_code == 200, classified.text
        assert rest.get("/readyz").status_code == 200
        assert httpx.post(f"{server.url}/v1/classify", content=PNG).status_code == 401


@contextmanager
def on_cores_of_their_own(server: Server) -> Iterator[None]:
    """The server's threads on one core and this test's (the pollers, the generator it
    starts) on another while the block runs, as the bench measured it: a worker alone on
    its core, its client not taking that core's time."""
    mine = os.sched_getaffinity(0)
    first, second, *_ = sorted(mine)
    for task in Path(f"/proc/{server.process.pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {first})
    os.sched_setaffinity(0, {second})  # this thread: threads and children it starts inherit
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_connections_to_the_probe_port_leave_the_rest_ports_limit_alone(
    keyed: tuple[Server, int],
) -> None:
    """CNNSERVE_MAX_CONNECTIONS (4 here) is the REST port's: idle connections to the
    probe port, which needs no key, made REST refuse requests (an outside audit)."""
    server, probe_port = keyed
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "image/png"}
    with kept_open(probe_port, 8):
        assert httpx.post(f"{server.url}/v1/classify", content=PNG, headers=headers).is_success
    with kept_open(server.port, 8):  # the limit itself is on
        refused = httpx.post(f"{server.url}/v1/classify", content=PNG, headers=headers)
        assert refused.status_code == 503 and "open HTTP connections" in refused.text


def test_probes_are_answered_at_once_while_an_open_loop_crowds_the_rest_port(
    tmp_path: Path,
) -> None:
    """The default model on one worker alone on a core, an open loop of photos at about
    four times what it serves (service.bench.open_loop, on the other core): it opens
    thousands of connections, faster than the worker accepts them. Every probe on the
    probe port, each on a new connection, is answered 200 within a kubelet's timeout all
    the while. (The same polls on the REST port timed out 4-5 times in each of 3 runs.)"""
    probe_port = free_port()
    env = {
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_ACCESS_LOG": "false",
        "CNNSERVE_PROBE_PORT": str(probe_port),
    }
    bodies = write_bodies(photo_mix().images[:20], tmp_path / "bodies")
    path = "/v1/classify?model=fashion_mnist"
    with (
        running_server(ROOT / "model_repository", env=env) as server,
        on_cores_of_their_own(server),
        probed(server, probe_port) as polls,
    ):
        run = run_load(server.url, path, bodies, rate=4000, seconds=5)
    assert set(run["statuses"]) <= {"200", "503"}, run["statuses"]
    assert len(polls) >= 20, polls
    slow = [(status, round(seconds, 3)) for status, seconds in polls if status != 200]
    assert not slow, (slow, len(polls), run["connections_opened"])


def test_with_workers_sigterm_turns_the_probe_port_503_then_closes_it(tiny_repo: Path) -> None:
    """Each worker serves the probe port (the supervisor's socket, shared as the REST
    port's is); on SIGTERM its readiness turns 503 first, then it refuses connections,
    and the server exits 0."""
    probe_port = free_port()
    env = {
        "CNNSERVE_WORKERS": "2",
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_PROBE_PORT": str(probe_port),
        "CNNSERVE_SHUTDOWN_DELAY_SECONDS": "1.5",
    }
    with running_server(tiny_repo, env=env) as server:
        assert {fresh_get(probe_port, "/readyz")[0] for _ in range(20)} == {200}
        server.process.send_signal(signal.SIGTERM)
        eventually(lambda: fresh_get(probe_port, "/readyz")[0] == 503, timeout=10)
        eventually(lambda: fresh_get(probe_port, "/healthz")[0] == 0, timeout=30)
        assert server.process.wait(timeout=30) == 0
