"""Hot swap, broken and deleted versions under sustained load; deadlines end to end;
graceful shutdown. All against real servers; waits poll the server's state."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from service.proto_gen import cnnserve_v1_pb2, cnnserve_v1_pb2_grpc
from service.readiness import process_alive
from tests.helpers.errors import error_of
from tests.helpers.images import encode, gradient
from tests.helpers.models import (
    publish_tiny,
    simple_config,
    tiny_repository,
    write_models_config,
)
from tests.helpers.server import (
    Server,
    accepted_by,
    read_response,
    running_server,
    workers_of,
)
from tests.helpers.tcp_proxy import tcp_proxy

PNG = encode(gradient(), "PNG")
RAW = {"content": PNG, "headers": {"content-type": "image/png"}}


def wait_for(predicate: Callable[[], bool], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition never held")
        time.sleep(0.05)


class Load:
    """Threads posting images until stopped; every answer's status and version noted."""

    def __init__(self, server: Server, threads: int = 4) -> None:
        self.server = server
        self.failures: list[str] = []
        self.versions: list[int] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        with self.server.client() as client:
            while not self._stop.is_set():
                r = client.post("/v1/classify", **RAW)  # type: ignore[arg-type]
                if r.status_code == 200:
                    self.versions.append(r.json()["version"])
                else:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")

    @contextmanager
    def running(self) -> Iterator[Load]:
        for t in self._threads:
            t.start()
        try:
            yield self
        finally:
            self._stop.set()
            for t in self._threads:
                t.join()


def states(server: Server, model: str = "m") -> dict[str, dict[str, object]]:
    body = httpx.get(f"{server.url}/v1/models/{model}", timeout=10).json()
    return {s["version"]: s for s in body["model_version_status"]}


def grpc_model_status(server: Server, model: str = "m") -> dict[int, str]:
    """Model ``model``'s versions and states over TF Serving's gRPC GetModelStatus."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    with server.channel() as channel:
        response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            request, timeout=10
        )
    name = get_model_status_pb2.ModelVersionStatus.State.Name
    return {s.version: name(s.state) for s in response.model_version_status}


def wrong_signature(folder: Path) -> None:
    """A valid SavedModel whose serving signature takes no image."""
    import tensorflow as tf

    class Adder(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def add(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": x + 1.0}

    module = Adder()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.add})


def break_version(repo: Path, version: int, how: str) -> None:
    """Write version ``version`` of model m broken in one way, beside and renamed in."""
    source = repo / "m" / "1"
    tmp = repo / "m" / f".tmp-{version}"
    if how == "wrong signature":
        wrong_signature(tmp)
    else:
        shutil.copytree(source, tmp)
        # Version 1 ships a verified LiteRT artifact, which is what serves: the
        # SavedModel beside it must be checked all the same.
        if how == "bad saved_model.pb":
            (tmp / "saved_model.pb").write_bytes(b"this is not a SavedModel")
        elif how == "truncated saved_model.pb":
            pb = (source / "saved_model.pb").read_bytes()
            (tmp / "saved_model.pb").write_bytes(pb[:100])
        elif how == "missing variables":
            shutil.rmtree(tmp / "variables")
        elif how == "missing variables shard":
            for shard in (tmp / "variables").glob("variables.data-*"):
                shard.unlink()
        elif how == "unreadable artifact":
            (tmp / "saved_model.pb").unlink()
            (tmp / "saved_model.pb").mkdir()  # a folder where a file belongs: unreadable
    tmp.rename(repo / "m" / str(version))


BROKEN = [
    "bad saved_model.pb",
    "truncated saved_model.pb",
    "missing variables",
    "missing variables shard",
    "wrong signature",
    "unreadable artifact",
]


@contextmanager
def serving_under_load(repo: Path) -> Iterator[tuple[Server, Load]]:
    """Model m version 1 served (polling every 0.2 s) and under load once answering."""
    publish_tiny(repo, "m", seed=1, with_litert=True)
    write_models_config(repo, simple_config("m"))
    with (
        running_server(repo, grpc_port=0, args=("--poll-seconds", "0.2")) as server,
        Load(server).running() as load,
    ):
        wait_for(lambda: len(load.versions) > 10)
        yield server, load


def test_broken_versions_under_load_never_serve_and_nothing_fails(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with serving_under_load(repo) as (server, load):
        for version, how in enumerate(BROKEN, start=2):
            break_version(repo, version, how)
            wait_for(lambda v=str(version): states(server).get(v, {}).get("state") == "END")
            status = states(server)[str(version)]["status"]
            assert status["error_code"] != "OK" and status["error_message"], (how, status)  # type: ignore[index]
        # A folder named beyond int64 is not a version (TF Serving ignores it too).
        beyond = repo / "m" / str(2**64)
        shutil.copytree(repo / "m" / "1", beyond)
        good = len(BROKEN) + 2
        publish_tiny(repo, "m", seed=2)  # a good version after them all: swapped in
        wait_for(lambda: good in load.versions)
        served_at_end = load.versions[-1]
        assert str(2**64) not in states(server)
        metrics = httpx.get(f"{server.url}/metrics").text
        grpc_status = grpc_model_status(server)
    assert load.failures == []
    assert set(load.versions) == {1, good} and served_at_end == good
    assert grpc_status[good] == "AVAILABLE" and 2**64 not in grpc_status
    failed = [line for line in metrics.splitlines() if 'event="load_failed"' in line]
    assert failed and float(failed[0].split()[-1]) >= len(BROKEN), failed
    log = server.log.read_text()
    assert all(f"m version {v} failed to load" in log for v in range(2, good)), log[-2000:]


def test_deleted_serving_version_is_kept_until_a_replacement_is_available(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with serving_under_load(repo) as (server, load):
        shutil.rmtree(repo / "m" / "1")
        seen = len(load.versions)
        wait_for(lambda: len(load.versions) > seen + 20)  # polls pass; v1 still serves
        assert states(server)["1"]["state"] == "AVAILABLE"
        # Version 2, written beside and renamed in (publish_tiny would reuse number 1).
        made = publish_tiny(repo.parent / "side", "m", seed=2)
        shutil.copytree(made, repo / "m" / ".tmp-2")
        (repo / "m" / ".tmp-2").rename(repo / "m" / "2")
        wait_for(lambda: 2 in load.versions)
        wait_for(lambda: "1" not in states(server) or states(server)["1"]["state"] == "END")
    assert load.failures == []
    assert set(load.versions) == {1, 2}


def test_workers_restarted_after_a_broken_publish_serve_the_good_version_at_once(
    tmp_path: Path,
) -> None:
    """SIGHUP restarts every worker (uvicorn's reload) after version 2 was published
    broken. The running workers kept version 1; new ones had nothing to keep: they tried
    version 2 only (latest, 1 version) and served nothing, their requests 404 and the
    replica's /readyz 503; and while loading, they took connections and answered 503.
    Now a new worker whose siblings serve listens only once loaded, falls back to the
    newest version that loads, and the replica stays ready: nothing fails throughout."""
    repo = tmp_path / "repo"
    publish_tiny(repo, "m", seed=1, with_litert=True)
    write_models_config(repo, simple_config("m"))
    env = {"CNNSERVE_WORKERS": "2"}
    with running_server(repo, env=env, args=("--poll-seconds", "0.2")) as server:
        break_version(repo, 2, "bad saved_model.pb")
        wait_for(lambda: states(server).get("2", {}).get("state") == "END")
        before = workers_of(server)
        answers: list[str] = []
        stop = threading.Event()

        def probe() -> None:  # a new connection each time: no kept-alive one to lose
            while not stop.is_set():
                try:
                    ready = httpx.get(f"{server.url}/readyz", timeout=30)
                    answer = httpx.post(f"{server.url}/v1/classify", timeout=30, **RAW)  # type: ignore[arg-type]
                except httpx.HTTPError as exc:  # e.g. a connection reset as a worker stopped
                    answers.append(f"{type(exc).__name__}: {exc}")
                    continue
                version = answer.json().get("version") if answer.status_code == 200 else None
                answers.append(f"ready {ready.status_code}, {answer.status_code} v{version}")

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            wait_for(lambda: len(answers) > 5)
            server.process.send_signal(signal.SIGHUP)
            wait_for(lambda: len(workers_of(server) - before) == 2)  # both replaced
            wait_for(lambda: server.log.read_text().count("serving version 1, the newest") == 2)
            seen = len(answers)
            wait_for(lambda: len(answers) > seen + 10)  # and served by the new ones
        finally:
            stop.set()
            prober.join()
    assert set(answers) == {"ready 200, 200 v1"}, sorted(set(answers))


def classify_until(
    stub: cnnserve_v1_pb2_grpc.ImageClassifierStub,
    stop: threading.Event,
    answered: list[int],
    failures: list[str],
) -> None:
    """Classify over gRPC, one call after another, until ``stop``: answers counted,
    failures noted by status and details."""
    while not stop.is_set():
        try:
            stub.Classify(cnnserve_v1_pb2.ClassifyRequest(image=PNG, model="tiny"), timeout=30)
            answered[0] += 1
        except grpc.RpcError as exc:
            failures.append(f"gRPC {exc.code().name} {exc.details()}")  # type: ignore[attr-defined]


@contextmanager
def under_load(
    threads: list[threading.Thread], stop: threading.Event, answered: list[int], first: int
) -> Iterator[None]:
    """Start the load ``threads``; once ``first`` answers came, run the block; then stop
    the threads and wait for them."""
    for t in threads:
        t.start()
    try:
        wait_for(lambda: answered[0] > first)
        yield
    finally:
        stop.set()
        for t in threads:
            t.join()


def more_answers(answered: list[int], count: int) -> None:
    """Wait until ``count`` more answers came."""
    seen = answered[0]
    wait_for(lambda: answered[0] > seen + count)


def rolling_restarts(
    server: Server,
    threads: list[threading.Thread],
    stop: threading.Event,
    answered: list[int],
    times: int = 1,
) -> None:
    """Under the load of ``threads``, SIGHUP the server ``times``, one rolling restart
    after another: each until both workers are replaced, the old ones gone, and 20
    more answers came."""
    with under_load(threads, stop, answered, first=20):
        for _ in range(times):
            before = workers_of(server)
            server.process.send_signal(signal.SIGHUP)
            wait_for(lambda: len(workers_of(server) - before) == 2)  # noqa: B023
            wait_for(lambda: not workers_of(server) & before)  # noqa: B023
            more_answers(answered, 20)


def test_a_rolling_restart_under_load_fails_no_request(tmp_path: Path) -> None:
    """SIGHUP replaces the workers one at a time while clients keep their connections
    busy: REST on kept-alive connections, gRPC on one channel. The old worker refused
    gRPC calls for half a second ("shutting down; retry on another replica": ~30 calls
    failed, though its successor already listened), and closed kept-alive connections
    between two requests (the next one lost: broken pipe)."""
    repo = tiny_repository(tmp_path, with_litert=True)
    env = {"CNNSERVE_WORKERS": "2", "CNNSERVE_POLL_SECONDS": "0"}
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def rest_load(server: Server) -> None:
        client = server.client()
        while not stop.is_set():
            try:
                r = client.post("/v1/classify", **RAW)  # type: ignore[arg-type]
            except httpx.TransportError as exc:
                failures.append(f"REST {type(exc).__name__}: {exc}")
                client.close()
                client = server.client()
                continue
            answered[0] += 1
            if r.status_code != 200:
                failures.append(f"REST {r.status_code} {r.text[:200]}")
        client.close()

    with (
        running_server(repo, grpc_port=0, env=env) as server,
        server.channel() as channel,
    ):
        log_of = server.log
        stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
        grpc_load = (stub, stop, answered, failures)
        threads = [threading.Thread(target=rest_load, args=(server,)) for _ in range(4)]
        threads += [threading.Thread(target=classify_until, args=grpc_load) for _ in range(2)]
        rolling_restarts(server, threads, stop, answered)
    # gRPC's own stop can still fail a call racing it: CANCELLED for one its core took in
    # but no handler yet (grpc/grpc#41785), and once in a suite run UNAVAILABLE
    # "Cancelling all calls" (the core's, at its stop). Not "failed to connect ...
    # Connection reset by peer": the channel's reconnect after a GOAWAY was hashed onto
    # one of the old worker's 64 listeners not yet closed, and reset at its close; the
    # channel backed off ~1 s and failed every call meanwhile (1,567 in a CI run, 12-06).
    # The old worker's listeners now all close before its stop sends any GOAWAY
    # (service.api.listeners).
    raced = ("gRPC CANCELLED", "gRPC UNAVAILABLE Cancelling all calls")
    unexplained = [f for f in failures if not f.startswith(raced)]
    assert not unexplained, (unexplained, log_of.read_text()[-6000:])
    assert len(failures) <= 4, failures


# The retry policy docs/serving.md recommends to gRPC clients.
SERVICE_CONFIG = Path(__file__).resolve().parents[2] / "docs" / "grpc-service-config.json"


def test_clients_with_the_documented_retry_policy_lose_no_call_in_rolling_restarts(
    tmp_path: Path,
) -> None:
    """Callers sharing one connection, as a client's channels do: the old workers' stops
    failed their calls taken in by gRPC's core but no handler yet (CANCELLED,
    grpc/grpc#41785): 24 callers, 173 calls in five rolling restarts without a retry
    policy; with the documented one (UNAVAILABLE and CANCELLED retried: these methods
    are idempotent), none in eight. Two rolling restarts here, none may fail."""
    repo = tiny_repository(tmp_path, with_litert=True)
    env = {"CNNSERVE_WORKERS": "2", "CNNSERVE_POLL_SECONDS": "0"}
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()
    options = [("grpc.service_config", SERVICE_CONFIG.read_text())]

    with (
        running_server(repo, grpc_port=0, env=env) as server,
        grpc.insecure_channel(server.grpc_target, options=options) as channel,
    ):
        grpc_load = (cnnserve_v1_pb2_grpc.ImageClassifierStub(channel), stop, answered, failures)
        threads = [threading.Thread(target=classify_until, args=grpc_load) for _ in range(8)]
        rolling_restarts(server, threads, stop, answered, times=2)
        assert not failures, (failures[:20], server.log.read_text()[-6000:])


def test_sighup_with_one_worker_is_said_and_ignored(tiny_repo: Path) -> None:
    """SIGHUP's default action ended a one-worker server at once: requests in flight
    lost, no drain, no log line. With one worker there is nothing to restart."""
    with running_server(tiny_repo, env={"CNNSERVE_POLL_SECONDS": "0"}) as server:
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: one worker" in server.log.read_text())
        assert server.process.poll() is None
        assert httpx.post(f"{server.url}/v1/classify", timeout=30, **RAW).status_code == 200  # type: ignore[arg-type]


def test_sighup_to_a_worker_is_said_and_ignored(tiny_repo: Path) -> None:
    """With several workers, SIGHUP sent to a worker (not the server) ended it at once,
    its requests lost, with no word from it."""
    env = {"CNNSERVE_POLL_SECONDS": "0", "CNNSERVE_WORKERS": "2"}
    with running_server(tiny_repo, env=env) as server:
        before = workers_of(server)
        os.kill(min(before), signal.SIGHUP)
        wait_for(lambda: "SIGHUP to a worker" in server.log.read_text())
        assert workers_of(server) == before
        assert httpx.post(f"{server.url}/v1/classify", timeout=30, **RAW).status_code == 200  # type: ignore[arg-type]


def test_a_worker_respawned_after_a_labelled_versions_folder_went_waits_for_it(
    tmp_path: Path,
) -> None:
    """A `specific` policy keeps a labelled version in memory after its folder went; a
    replacement worker (respawned, or each new worker of a SIGHUP restart) served the
    model, so it listened, and answered the label 404: after a SIGHUP, every canary
    request for good. Now it waits, not listening, while its siblings serve the label."""
    repo = tmp_path / "repo"
    publish_tiny(repo, "m", seed=1, with_litert=True)
    publish_tiny(repo, "m", seed=2, with_litert=True)  # version 2
    write_models_config(
        repo,
        simple_config("m", policy="specific { versions: 1 versions: 2 }", labels={"canary": 2}),
    )
    env = {"CNNSERVE_WORKERS": "2"}
    with running_server(repo, env=env, args=("--poll-seconds", "0.2")) as server:
        shutil.rmtree(repo / "m" / "2")
        wait_for(lambda: server.log.read_text().count("the folder of version 2 is gone") >= 2)
        os.kill(min(workers_of(server)), signal.SIGKILL)
        wait_for(lambda: "this worker cannot serve m version 2" in server.log.read_text())
        for _ in range(20):  # new connections: only the worker that serves the label
            answer = httpx.post(
                f"{server.url}/v1/classify?model=m&label=canary",
                timeout=30,
                **RAW,  # type: ignore[arg-type]
            )
            assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("then", ["a version appears", "SIGTERM"])
def test_a_worker_respawned_after_the_serving_folder_went_waits_for_a_version(
    tmp_path: Path, then: str
) -> None:
    """The serving version's folder is deleted (the workers keep it in memory), then a
    worker dies: its replacement could load nothing, listened anyway, and answered its
    share of new connections 404 (its /readyz 503: the replica flapped). Now it waits,
    not listening, until a version it can load appears; a SIGTERM meanwhile still stops
    the server."""
    repo = tmp_path / "repo"
    publish_tiny(repo, "m", seed=1, with_litert=True)
    write_models_config(repo, simple_config("m"))
    env = {"CNNSERVE_WORKERS": "2"}
    with running_server(repo, env=env, args=("--poll-seconds", "0.2")) as server:
        kept = tmp_path / "kept"
        shutil.copytree(repo / "m" / "1", kept)
        shutil.rmtree(repo / "m" / "1")
        wait_for(lambda: server.log.read_text().count("keeping version") >= 2)
        before = workers_of(server)
        os.kill(min(before), signal.SIGKILL)
        wait_for(lambda: "this worker cannot serve m" in server.log.read_text())
        for _ in range(20):  # new connections: only the worker that serves takes them
            assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200
            assert httpx.post(f"{server.url}/v1/classify", timeout=30, **RAW).status_code == 200  # type: ignore[arg-type]
        if then == "SIGTERM":
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=60) == 0
            return
        shutil.copytree(kept, repo / "m" / ".tmp-2")
        (repo / "m" / ".tmp-2").rename(repo / "m" / "2")
        wait_for(lambda: "serves what its siblings serve: listening" in server.log.read_text())
        assert len(workers_of(server)) == 2
        for _ in range(20):
            assert httpx.post(f"{server.url}/v1/classify", timeout=30, **RAW).status_code == 200  # type: ignore[arg-type]


def restore(path: Path, text: str) -> None:
    path.write_text(text)


@contextmanager
def two_workers_on_a_broken_config(tmp_path: Path) -> Iterator[tuple[Server, Callable[[], None]]]:
    """Two workers serving model m, whose models.config then breaks (both ignore it and
    serve on); yields the server and what puts the good models.config back."""
    repo = tmp_path / "repo"
    publish_tiny(repo, "m", seed=1, with_litert=True)
    write_models_config(repo, simple_config("m"))
    config = repo / "models.config"
    good = config.read_text()
    env = {"CNNSERVE_WORKERS": "2"}
    with running_server(repo, env=env, args=("--poll-seconds", "0.2")) as server:
        config.write_text(good.replace("config {", "config { oops: 1", 1))
        wait_for(lambda: server.log.read_text().count("ignoring models.config change") == 2)
        yield server, lambda: restore(config, good)


def test_a_worker_dying_while_models_config_is_broken_does_not_stop_the_server(
    tmp_path: Path,
) -> None:
    """The running workers ignore a broken models.config and keep serving; the worker
    that replaces one that died could not read it at start-up, failed to start, and
    uvicorn stopped the whole server. Now it starts but does not listen until
    models.config reads again (its siblings serve), then serves like them."""
    with two_workers_on_a_broken_config(tmp_path) as (server, fix):
        before = workers_of(server)
        os.kill(min(before), signal.SIGKILL)
        wait_for(lambda: "nothing is served by this worker" in server.log.read_text())
        assert server.process.poll() is None, server.log.read_text()[-2000:]
        fix()
        wait_for(lambda: len(workers_of(server) - before) == 1)

        def all_serve() -> bool:  # new connections: the kernel picks the worker
            return all(
                httpx.post(f"{server.url}/v1/classify", timeout=30, **RAW).status_code == 200  # type: ignore[arg-type]
                for _ in range(20)
            )

        wait_for(all_serve)


def test_sighup_with_a_broken_models_config_keeps_the_workers_that_serve(
    tmp_path: Path,
) -> None:
    """A rolling restart whose new workers cannot read models.config: each fails to
    start, and uvicorn keeps the old worker and gives up the restart (a new worker that
    started with nothing to serve replaced every good one: all requests 503)."""
    with two_workers_on_a_broken_config(tmp_path) as (server, _):
        before = workers_of(server)
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "aborting the restart" in server.log.read_text())
        assert workers_of(server) == before
        for _ in range(10):  # new connections: either worker
            assert httpx.post(f"{server.url}/v1/classify", timeout=30, **RAW).status_code == 200  # type: ignore[arg-type]


def read_to_close(sock: socket.socket) -> bytes:
    answer = b""
    while part := sock.recv(65536):
        answer += part
    return answer


def test_a_connection_accepted_as_shutdown_begins_gets_its_answer(tiny_repo: Path) -> None:
    """A client that connected just before the server stopped sends its request a moment
    later, as does one between two requests on a kept-alive connection: the connection
    was closed with the request unread, which the kernel answers with a reset
    ("connection reset by peer", "broken pipe", seen in every rolling restart under
    load). Each gets a moment to begin its request, which is answered; then the
    connection closes."""
    env = {"CNNSERVE_POLL_SECONDS": "0", "CNNSERVE_SHUTDOWN_GRACE_SECONDS": "120"}
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with (
        running_server(tiny_repo, env=env) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock,
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as kept,
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as dribbler,
    ):
        kept.sendall(request)
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")  # kept alive, idle now
        wait_for(lambda: accepted_by({server.process.pid}, sock))
        wait_for(lambda: accepted_by({server.process.pid}, dribbler))
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "Shutting down" in server.log.read_text())
        sock.sendall(request)
        kept.sendall(request)
        # One that sends a byte and no more is closed when the grace ends: it held the
        # shutdown for the whole of CNNSERVE_SHUTDOWN_GRACE_SECONDS (120 s here).
        dribbler.sendall(b"G")
        answers = [read_to_close(sock), read_to_close(kept)]
        assert server.process.wait(timeout=60) == 0
    for answer in answers:
        head = answer.partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head, answer[:300]


@pytest.fixture(scope="module")
def grpc_server(tiny_repo: Path) -> Iterator[Server]:
    with running_server(tiny_repo, grpc_port=0, env={"CNNSERVE_POLL_SECONDS": "0"}) as server:
        yield server


def test_expired_deadlines_get_504_saying_so_and_never_run(grpc_server: Server) -> None:
    def expired() -> float:
        text = httpx.get(f"{grpc_server.url}/metrics").text
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("cnnserve_deadline_expirations_total{")
        )

    before = expired()
    with grpc_server.client() as client:
        r = client.post(
            "/v1/classify", headers={**RAW["headers"], "x-request-timeout": "0.000001"}, content=PNG
        )  # type: ignore[dict-item]
        assert r.status_code == 504, r.text
        assert error_of(r)[0] == "deadline_exceeded"
        assert "deadline passed" in error_of(r)[1]
        ok = client.post(
            "/v1/classify", headers={**RAW["headers"], "x-request-timeout": "5"}, content=PNG
        )  # type: ignore[dict-item]
        assert ok.status_code == 200
    with grpc_server.channel() as channel:
        stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as late:
            stub.Classify(cnnserve_v1_pb2.ClassifyRequest(image=PNG), timeout=0.0005)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: expired() > before, timeout=10)


@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        ("/v1/classify", "multipart/form-data; boundary=b", b"no multipart at all"),
        ("/v1/models/tiny:predict", "application/json", b"{no JSON at all"),
        ("/v1/classify", "image/png", PNG),
    ],
    ids=["multipart", "predict-json", "raw-image"],
)
def test_a_deadline_that_passed_while_the_body_came_is_answered_before_it_is_parsed(
    grpc_server: Server, path: str, content_type: str, body: bytes
) -> None:
    """A body the route parses before it knows its images (multipart, JSON) is checked
    again once it is in, before parsing: its request's deadline passed meanwhile, it
    gets the 504 unparsed (these bodies are no multipart or JSON at all: parsed, they
    were a 400). A raw image, which the HTTP protocol answers itself, counts its
    deadline from its headers too: from its body's end, it was run and answered 200."""
    with grpc_server.client() as client:
        assert client.post("/v1/classify", **RAW).status_code == 200  # type: ignore[arg-type]
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"X-Request-Timeout: 0.2\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", grpc_server.port), timeout=30) as sock:
        sock.sendall(head)
        # The deadline passes (the clock is what is tested; with a margin for a loaded
        # host to start the route late, when the deadline's clock starts).
        time.sleep(1.5)
        sock.sendall(body)
        answer, content, _ = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 504"), answer
    assert b"x-error-code: deadline_exceeded" in answer.lower(), (answer, content)


def test_a_replica_stopping_behind_a_balancer_loses_no_call_of_retrying_clients(
    tiny_repo_litert: Path,
) -> None:
    """Two replicas behind an L4 balancer; the client's one connection is on the first,
    which gets SIGTERM. Its stop's GOAWAY sends the next calls to the other replica, and
    the calls the stop ended (CANCELLED, grpc/grpc#41785) are retried by the documented
    policy: none fails. Our handlers refused new calls UNAVAILABLE for 0.5 s before the
    stop, on the same connection, to the same replica: 8 callers lost 1,093-1,174 calls
    a SIGTERM, the retry policy's too."""
    env = {"CNNSERVE_POLL_SECONDS": "0"}
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()
    options = [
        ("grpc.service_config", SERVICE_CONFIG.read_text()),
        ("grpc.use_local_subchannel_pool", 1),  # its own connection, through the proxy
    ]
    with (
        running_server(tiny_repo_litert, grpc_port=0, env=env) as first,
        running_server(tiny_repo_litert, grpc_port=0, env=env) as second,
        tcp_proxy([first.grpc_port, second.grpc_port]) as port,
        grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel,
    ):
        grpc_load = (cnnserve_v1_pb2_grpc.ImageClassifierStub(channel), stop, answered, failures)
        threads = [threading.Thread(target=classify_until, args=grpc_load) for _ in range(8)]
        with under_load(threads, stop, answered, first=100):
            first.process.send_signal(signal.SIGTERM)
            assert first.process.wait(timeout=60) == 0
            more_answers(answered, 100)  # served by the second
        assert access_statuses(second.log.read_text(), "grpc") == {200}
    assert not failures, (failures[:20], first.log.read_text()[-6000:])


# How a call that no handler took ends at the server's stop: UNAVAILABLE once the
# connection has gone (a new one finds no listener), CANCELLED for one gRPC's core had
# taken in but not handed on yet (grpc/grpc#41785).
NEVER_HANDLED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def access_statuses(log: str, protocol: str) -> set[int]:
    """The statuses of the access-log lines of ``protocol`` in a server's log."""
    lines = (json.loads(line) for line in log.splitlines() if line.startswith('{"time"'))
    return {line["status"] for line in lines if line["protocol"] == protocol}


def test_sigterm_turns_readiness_503_first_drains_and_exits_0(tiny_repo: Path) -> None:
    env = {
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_SHUTDOWN_DELAY_SECONDS": "1.5",
        "CNNSERVE_SHUTDOWN_GRACE_SECONDS": "10",
    }
    with running_server(tiny_repo, grpc_port=0, env=env) as server:
        rest: list[int] = []
        grpc_codes: list[str] = []
        stop = threading.Event()

        def rest_load() -> None:
            with server.client() as client:
                while not stop.is_set():
                    try:
                        rest.append(client.post("/v1/classify", **RAW).status_code)  # type: ignore[arg-type]
                    except httpx.TransportError:
                        return  # the listener closed: not an accepted request

        def grpc_load() -> None:
            with server.channel() as channel:
                stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
                while not stop.is_set():
                    try:
                        stub.Classify(cnnserve_v1_pb2.ClassifyRequest(image=PNG), timeout=10)
                        grpc_codes.append("OK")
                    except grpc.RpcError as exc:
                        if exc.code() in NEVER_HANDLED:
                            return  # the stop's: no handler took the call (see below)
                        grpc_codes.append(exc.code().name)

        threads = [threading.Thread(target=rest_load) for _ in range(2)]
        threads.append(threading.Thread(target=grpc_load))
        for t in threads:
            t.start()
        wait_for(lambda: len(rest) > 5 and len(grpc_codes) > 5)
        server.process.send_signal(signal.SIGTERM)
        with server.client() as probe:
            wait_for(lambda: probe.get("/readyz").status_code == 503, timeout=5)
            served_while_draining = len(rest)
            server.process.send_signal(signal.SIGTERM)  # a second: the shutdown goes on
            with server.channel() as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        code = server.process.wait(timeout=30)
        stop.set()
        for t in threads:
            t.join()
        assert code == 0
        assert set(rest) == {200} and set(grpc_codes) == {"OK"}, (set(rest), set(grpc_codes))
        assert len(rest) >= served_while_draining
    log = server.log.read_text()
    # Every call a handler took was answered: the client's last call, if it failed, was
    # one the stop ended before any handler had it (no line in the access log).
    assert access_statuses(log, "grpc") == {200}, log[-4000:]
    assert log.count("SIGTERM: readiness is 503 now") == 1, log
    assert log.count("SIGTERM again: already shutting down") == 1, log


def test_sigterm_with_workers_refuses_new_connections_and_no_watch_holds_it(
    tiny_repo: Path,
) -> None:
    """With several workers the listening socket is the supervisor's, shared with them:
    while the supervisor held it, connections made after the workers closed theirs were
    accepted by the kernel, never answered, and reset when the supervisor exited (after
    the whole grace period). And an open health Watch stream held that grace period."""
    env = {
        "CNNSERVE_WORKERS": "2",
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_SHUTDOWN_DELAY_SECONDS": "0.5",
        "CNNSERVE_SHUTDOWN_GRACE_SECONDS": "120",  # far beyond the waits below
    }
    with running_server(tiny_repo, grpc_port=0, env=env) as server:
        statuses: list[int] = []
        watch_done = threading.Event()

        def watch() -> None:
            with server.channel() as channel:
                stream = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(), timeout=100
                )
                statuses.extend(reply.status for reply in stream)  # until the stream ends
            watch_done.set()

        watcher = threading.Thread(target=watch)
        watcher.start()
        wait_for(lambda: health_pb2.HealthCheckResponse.SERVING in statuses)
        server.process.send_signal(signal.SIGTERM)

        def refused() -> bool:
            """A new connection is refused, or answered: never accepted and left."""
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                    sock.settimeout(5)
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    answer = sock.recv(4096)
            except ConnectionRefusedError:
                return True
            except ConnectionResetError:
                return False  # closed under us as the listener went: try again
            assert answer.startswith(b"HTTP/1.1 "), f"accepted, then no answer: {answer!r}"
            return False

        wait_for(refused, timeout=60)
        assert server.process.wait(timeout=60) == 0  # the Watch did not hold the grace (120 s)
        watcher.join(timeout=10)
        assert watch_done.is_set()
        assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING


@contextmanager
def upload_in_flight(server: Server) -> Iterator[None]:
    """A raw-image upload whose body is still coming while the block runs (the server
    answers others meanwhile); then its body, answered 200: a stop waits for it."""
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(PNG)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as upload:
        upload.sendall(head + PNG[:10])
        with server.client() as probe:
            wait_for(lambda: probe.post("/v1/classify", **RAW).status_code == 200)  # type: ignore[arg-type]
        yield
        upload.sendall(PNG[10:])
        answer = upload.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def grpc_refused(server: Server) -> bool:
    """Whether a new gRPC call is refused UNAVAILABLE (the server stopped taking calls);
    False while it is served."""
    with server.channel() as channel:
        stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
        try:
            stub.Classify(cnnserve_v1_pb2.ClassifyRequest(image=PNG), timeout=5)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            return True
        return False


def test_sigterm_stops_grpc_beside_rest_not_after_it(tiny_repo: Path) -> None:
    """gRPC waited for REST's drain before it stopped: while one upload was still in
    flight, new gRPC calls were taken and run, and the exit took two grace periods."""
    env = {
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_SHUTDOWN_DELAY_SECONDS": "0.5",
        "CNNSERVE_SHUTDOWN_GRACE_SECONDS": "30",
    }
    with running_server(tiny_repo, grpc_port=0, env=env) as server:
        with upload_in_flight(server):
            server.process.send_signal(signal.SIGTERM)
            wait_for(lambda: grpc_refused(server), timeout=10)  # the upload still in flight
        assert server.process.wait(timeout=20) == 0  # within one grace (30 s), not two


def test_uploads_still_coming_when_the_grace_ends_get_a_503_not_a_500(tiny_repo: Path) -> None:
    """An upload whose body was still coming when the shutdown's grace period ended got
    uvicorn's plain-text 500 and a traceback in the log (multipart: the ASGI way), or
    was dropped with no answer and no access-log line (a raw image: the direct path)."""
    env = {
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_SHUTDOWN_DELAY_SECONDS": "0.2",
        "CNNSERVE_SHUTDOWN_GRACE_SECONDS": "1",
    }
    multipart = b"--b\r\nContent-Disposition: form-data; name=image; filename=a.png\r\n\r\n"
    bodies = {"image/png": PNG, "multipart/form-data; boundary=b": multipart + PNG}
    with running_server(tiny_repo, grpc_port=0, env=env) as server:
        uploads = []
        for content_type, body in bodies.items():
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            head = (
                f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                f"X-Request-ID: upload-{len(uploads)}\r\nContent-Length: {len(body) + 10}\r\n\r\n"
            ).encode()
            sock.sendall(head + body)  # 10 bytes short: its body is still coming
            uploads.append(sock)
        with server.client() as probe:
            wait_for(lambda: probe.post("/v1/classify", **RAW).status_code == 200)  # type: ignore[arg-type]
        server.process.send_signal(signal.SIGTERM)
        for sock in uploads:
            with sock:
                answer, content, _ = read_response(sock)
            assert answer.startswith(b"HTTP/1.1 503 "), (answer, content)
            assert b"connection: close" in answer.lower()
            error = json.loads(content)["error"]
            assert error["code"] == "unavailable", error
            assert "grace period ended" in error["message"], error
        assert server.process.wait(timeout=60) == 0
    log = server.log.read_text()
    assert "Exception in ASGI application" not in log and "Traceback" not in log, log
    for n in range(len(bodies)):
        assert f'"request_id":"upload-{n}"' in log and '"status":503' in log, log


def test_workers_stop_when_their_supervisor_is_killed(tiny_repo: Path) -> None:
    """kill -9 of the supervisor left its workers serving, orphaned: nothing respawned
    them, the next server could not listen on their port, and the next `cnnserve serve`
    removed their metrics folder (their /metrics a 500). Now they drain and exit."""
    env = {"CNNSERVE_WORKERS": "2", "CNNSERVE_POLL_SECONDS": "0"}
    with running_server(tiny_repo, env=env) as server:
        workers = workers_of(server)
        assert len(workers) == 2
        server.process.kill()
        server.process.wait(timeout=30)

        def gone() -> bool:
            return not any(process_alive(pid) for pid in workers)

        wait_for(gone, timeout=60)
        with socket.socket() as again:  # the port is free for the next server
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", server.port))


def test_sigint_stops_grpc_with_rest_and_ends_health_watches_not_serving(
    tiny_repo: Path,
) -> None:
    """Ctrl-C (SIGINT) closed REST at once, but gRPC took new calls for ~2.6 s more and
    an open health Watch ended without NOT_SERVING. It stops as SIGTERM does, at once:
    no readiness delay, since a person at a terminal is waiting."""
    env = {
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_SHUTDOWN_DELAY_SECONDS": "30",  # SIGINT does not wait for it
        "CNNSERVE_SHUTDOWN_GRACE_SECONDS": "30",
    }
    with running_server(tiny_repo, grpc_port=0, env=env) as server:
        statuses: list[int] = []

        def watch() -> None:
            with server.channel() as channel:
                stream = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(), timeout=60
                )
                with contextlib.suppress(grpc.RpcError):  # ended by the server's stop
                    statuses.extend(reply.status for reply in stream)

        watcher = threading.Thread(target=watch)
        watcher.start()
        wait_for(lambda: health_pb2.HealthCheckResponse.SERVING in statuses)
        with upload_in_flight(server):
            server.process.send_signal(signal.SIGINT)
            wait_for(lambda: health_pb2.HealthCheckResponse.NOT_SERVING in statuses, timeout=10)
            wait_for(lambda: grpc_refused(server), timeout=10)  # the upload still in flight
        server.process.wait(timeout=20)
        watcher.join(timeout=10)
        assert not watcher.is_alive()


def test_a_second_sigint_stops_at_once_and_says_so_in_its_exit_status(tiny_repo: Path) -> None:
    """Ctrl-C twice cuts the drain (uvicorn's force quit): it exited 0, as after a clean
    drain, with a traceback of the cancelled lifespan in the log."""
    env = {"CNNSERVE_POLL_SECONDS": "0", "CNNSERVE_SHUTDOWN_GRACE_SECONDS": "60"}
    with running_server(tiny_repo, grpc_port=0, env=env) as server:
        head = (
            f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(PNG)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as upload:
            upload.sendall(head + PNG[:10])  # in flight: the drain waits for it
            server.process.send_signal(signal.SIGINT)
            wait_for(lambda: "SIGINT: readiness is 503" in server.log.read_text(), timeout=10)
            server.process.send_signal(signal.SIGINT)
            assert server.process.wait(timeout=20) == 128 + signal.SIGINT
        written = server.log.read_text()
        assert "stopped at once (SIGINT twice)" in written
        assert "Traceback" not in written, written[-3000:]


def test_sigterm_ends_the_process_while_a_load_hangs_on_a_read(
    tiny_repo_litert: Path, tmp_path: Path
) -> None:
    """A version whose file read never returns (a FIFO in place of its labels, standing
    in for a stuck network file system): after SIGTERM the worker logged "Finished
    server process" and lived on until the read returned (15 min in an audit), since
    the load ran on the event loop's default executor, which asyncio.run waits for."""
    repository = tmp_path / "repo"
    shutil.copytree(tiny_repo_litert, repository)  # no conversion, whose lock v1 would wait on
    hung = repository / "tiny" / "2"
    shutil.copytree(repository / "tiny" / "1", hung)
    (hung / "assets.extra" / "labels.txt").unlink()
    os.mkfifo(hung / "assets.extra" / "labels.txt")
    env = {
        "CNNSERVE_LOAD_TIMEOUT_SECONDS": "1",
        "CNNSERVE_SHUTDOWN_DELAY_SECONDS": "0",
        "CNNSERVE_SHUTDOWN_GRACE_SECONDS": "2",
    }
    with running_server(repository, env=env) as server:  # ready: version 1, after 1 s
        server.process.send_signal(signal.SIGTERM)
        try:
            assert server.process.wait(timeout=60) == 0
        finally:
            with contextlib.suppress(OSError):  # let a hung reader go in any case
                fd = os.open(hung / "assets.extra" / "labels.txt", os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
