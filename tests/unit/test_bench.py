"""`cnnserve bench`'s arithmetic, on canned numbers: wrk's JSON, the limit, the advisor;
and what wrk sends a gateway with API keys."""

from __future__ import annotations

import shutil
import socket
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.bench import advisor, grpc_load
from service.bench.limits import cost_at, limit
from service.bench.sweep import Batching, Plan, classify_path
from service.bench.wrk import (
    KeyRefused,
    Load,
    generator_result,
    key_refusals,
    run_wrk,
    summarize,
)
from service.cli import main
from tests.helpers.http_stub import QuietHandler, http_stub
from tests.helpers.server import ROOT

WRK_JSON = {
    "requests": 1010,
    "duration_us": 2_000_000,
    "bytes": 123,
    "errors": {"connect": 0, "read": 0, "write": 0, "status": 10, "timeout": 2},
    "statuses": {"200": 1000, "503": 10},
    "latency_us": {
        "mean": 5000.0,
        "max": 90000,
        "percentiles": {"50": 4000, "90": 8000, "99": 20000, "99.9": 80000},
    },
}


def test_wrk_json_becomes_milliseconds_and_errors_by_status() -> None:
    result = summarize(WRK_JSON, wrk_cpu_s=0.5, wall_s=2.0)
    assert result["requests_per_s"] == 500.0  # 2xx only
    assert (result["p50_ms"], result["p99_ms"], result["p99.9_ms"]) == (4.0, 20.0, 80.0)
    assert result["errors"] == {"503": 10, "timeout": 2}
    assert result["generator_cores"] == 0.25


def test_inference_cost_is_interpolated_between_measured_batches() -> None:
    costs = {1: 1.0, 2: 0.8, 4: 0.5}
    assert cost_at(costs, 0.5) == 1.0 and cost_at(costs, 9) == 0.5
    assert cost_at(costs, 3) == pytest.approx(0.65)
    got = limit(cores=2, http_s=0.001, decode_s=0.0005, infer_s=0.0005)
    assert got["limit_rps"] == 1000.0


def point(rps: float, p99: float, batch: int, errors: dict[str, int] | None = None) -> Any:
    return {
        "requests_per_s": rps,
        "p99_ms": p99,
        "ok": 1,
        "errors": errors or {},
        "workers": 2,
        "connections": 32,
        "served_batch": 3.5,
        "max_batch_size": batch,
        "batch_timeout_micros": 1000,
        "num_batch_threads": 2,
    }


def test_advisor_picks_the_fastest_point_within_the_slo() -> None:
    runs = [
        {"points": [point(900, 40, 8), point(1500, 150, 32)]},
        {"points": [point(1200, 90, 16), point(2000, 80, 64, {"503": 3})]},
    ]
    advice = advisor.recommend(runs, slo_p99_ms=100)
    assert advice["meets_slo"] and advice["max_batch_size"] == 16
    assert advice["batching_config"] == (
        "max_batch_size { value: 16 }\n"
        "batch_timeout_micros { value: 1000 }\n"
        "num_batch_threads { value: 2 }\n"
    )
    assert "CNNSERVE_WORKERS=2" in advisor.describe(advice)
    missed = advisor.recommend(runs, slo_p99_ms=10)
    assert not missed["meets_slo"] and missed["max_batch_size"] == 8  # lowest p99


def test_batching_parse_and_environment() -> None:
    b = Batching.parse("32:1000:2")
    assert b.env() == {
        "CNNSERVE_MAX_BATCH_SIZE": "32",
        "CNNSERVE_BATCH_TIMEOUT_MICROS": "1000",
        "CNNSERVE_NUM_BATCH_THREADS": "2",
    }
    with pytest.raises(ValueError, match="max_batch:timeout_us:threads"):
        Batching.parse("32:1000")
    for out_of_range in ("0:1000:1", "32:1000:0", "32:-1:1"):
        with pytest.raises(ValueError, match="at least"):
            Batching.parse(out_of_range)


def test_decode_alone_is_the_fastest_of_fresh_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each measurement is a real decode in its own process; the limit takes the
    fastest, and a process that fails says why instead of giving a number."""
    from service.bench import limits
    from service.config import Settings
    from tests.helpers.images import encode, gradient

    version = ROOT / "model_repository" / "fashion_mnist" / "1"
    images = [encode(gradient(224, 224), "JPEG"), encode(gradient(300, 200), "PNG")]
    seen: list[float] = []
    measure = limits._decode_in_process

    def recorded(*args: Any) -> float:
        seen.append(measure(*args))
        return seen[-1]

    monkeypatch.setattr(limits, "_decode_in_process", recorded)
    cost = limits.decode_cost(images, version, Settings(), seconds=0.3)
    assert len(seen) == limits.DECODE_PROCESSES
    assert cost == min(seen) and 0 < cost < 0.5

    with pytest.raises(RuntimeError, match="decode measurement failed"):
        measure(tmp_path / "missing", version, 10**6, 0.1, 0)


GATEWAY_KEY = "bench-key-0123"


@contextmanager
def keyed_server() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server answering 200 to requests bearing GATEWAY_KEY, else 401;
    yields its URL and the Authorization headers it got."""
    seen: list[str] = []

    class Handler(QuietHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            seen.append(self.headers.get("authorization") or "")
            ok = self.headers.get("authorization") == f"Bearer {GATEWAY_KEY}"
            self.send_response(200 if ok else 401)
            self.send_header("content-length", "0")
            self.end_headers()

        do_GET = do_POST = _answer

    with http_stub(Handler) as url:
        yield url, seen


needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")


@needs_wrk
def test_wrk_sends_the_key_of_the_commands_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a gateway with keys every request was a 401 (and bench exited 0)."""
    monkeypatch.setenv("CNNSERVE_API_KEYS", f"other-key,{GATEWAY_KEY}")
    monkeypatch.delenv("CNNSERVE_API_KEYS_FILE", raising=False)
    body = tmp_path / "body.jpg"
    body.write_bytes(b"\xff\xd8 not really a jpeg")
    with keyed_server() as (url, seen):
        for load in (Load("/healthz"), Load("/v1/classify", bodies=(body,))):
            result = run_wrk(url, load, connections=1, seconds=1)
            assert result["ok"] > 0 and set(result["statuses"]) == {"200"}, result
    assert set(seen) == {f"Bearer {GATEWAY_KEY}"}  # the least key, the one verify sends


def test_the_overload_probes_and_the_batch_count_send_the_key_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Beside wrk, `bench --overload`'s own clients (the polite probe, readiness) and the
    sweep's read of /metrics sent no key: 401s measured as the gateway's answers."""
    import threading

    from service.bench.overload import Client
    from service.bench.sweep import served_batches

    monkeypatch.setenv("CNNSERVE_API_KEYS", GATEWAY_KEY)
    monkeypatch.delenv("CNNSERVE_API_KEYS_FILE", raising=False)
    with keyed_server() as (url, seen):
        stop = threading.Event()
        for client in (
            Client(url, "/v1/classify", [b"x"], 0.0, 0.0),
            Client(url, "/readyz", [], 0.0, 0.0),
        ):
            runner = threading.Thread(target=client.run, args=(stop,))
            runner.start()
            while not client.samples:
                stop.wait(0.01)
            stop.set()
            runner.join()
            stop.clear()
            assert {s.status for s in client.samples} == {200}, client.samples
        assert served_batches(url, "/metrics") == (0.0, 0.0)  # a 401 raised HTTPError
    assert seen and set(seen) == {f"Bearer {GATEWAY_KEY}"}


@needs_wrk
def test_wrk_stops_on_a_refused_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNSERVE_API_KEYS", "not-the-gateways")
    monkeypatch.delenv("CNNSERVE_API_KEYS_FILE", raising=False)
    with keyed_server() as (url, _), pytest.raises(KeyRefused) as refused:
        run_wrk(url, Load("/healthz"), connections=1, seconds=1)
    message = str(refused.value)
    assert message.startswith(f"{url}/healthz answered 401 to ")
    assert "CNNSERVE_API_KEYS" in message and "not-the-gateways" not in message


def test_bench_fails_when_no_request_succeeded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every request failed, and bench wrote its report and exited 0."""
    from service.bench import sweep

    def refused_everything(plan: Any, settings: Any) -> dict[str, Any]:
        point = {"ok": 0, "statuses": {"415": 20}}
        return {"runs": [{"points": [point, point]}]}

    monkeypatch.setattr(sweep, "run", refused_everything)
    monkeypatch.setattr(sweep, "make_payload", lambda name, folder: None)
    output = tmp_path / "bench.json"
    repository = ROOT / "model_repository"
    args = ["bench", "--model-repository", str(repository), "--output", str(output)]
    assert main([*args, "--no-reference"]) == 1
    assert "no request to the gateway succeeded (statuses: 415)" in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize("where", ["under a file", "a folder"])
def test_bench_checks_its_output_before_measuring(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole sweep ran, then its results were lost to a traceback writing --output."""
    from service.bench import sweep

    def measured(plan: Any, settings: Any) -> dict[str, Any]:
        raise AssertionError("measured before checking --output")

    monkeypatch.setattr(sweep, "run", measured)
    monkeypatch.setattr(sweep, "make_payload", lambda name, folder: None)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    output = a_file / "bench.json" if where == "under a file" else tmp_path
    args = ["bench", "--model-repository", str(ROOT / "model_repository"), "--no-reference"]
    assert main([*args, "--output", str(output)]) == 2
    err = capsys.readouterr().err
    told = (
        f"cannot write the report to {a_file}: "
        if where == "under a file"
        else f"--output {tmp_path} is a folder"
    )
    assert err.startswith(f"cnnserve bench: {told}") and err.count("\n") == 1, err


def test_a_running_gateway_is_asked_for_the_version_the_report_names(tmp_path: Path) -> None:
    """wrk's requests name the model and version the report is about, on a --url
    gateway and on one bench starts alike."""
    for url in ("http://127.0.0.1:1", None):
        plan = Plan(tmp_path, tmp_path / "my model" / "2", [1], [], url=url)
        assert classify_path(plan) == "/v1/classify?model=my+model&version=2"


def test_bench_names_a_version_the_gateway_it_starts_would_not_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--version 1 of a repository whose policy serves the newest: its gateway would
    answer every pinned request 404, after minutes of measuring."""
    repository = tmp_path / "repo"
    shutil.copytree(ROOT / "model_repository", repository)
    model = repository / "fashion_mnist"
    shutil.copytree(model / "1", model / "2")
    output = tmp_path / "bench.json"
    args = ["bench", "--model-repository", str(repository), "--output", str(output)]
    assert main([*args, "--version", "1", "--no-reference"]) == 2
    err = capsys.readouterr().err
    assert "serves versions [2] of fashion_mnist (latest), not 1" in err, err
    assert not output.exists()


def test_a_grpc_load_refused_its_key_fails_like_wrks(tmp_path: Path) -> None:
    """`bench --overload --protocol grpc` against a gateway that refuses the key raises
    KeyRefused, as wrk's run does, instead of reporting UNAUTHENTICATED as answers."""

    def refuse(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "an API key is required")
        raise AssertionError("abort raises")

    class Refusing(grpc.GenericRpcHandler):
        def service(self, details: Any) -> Any:
            return grpc.unary_unary_rpc_method_handler(refuse)

    server = grpc.server(ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((Refusing(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    body = tmp_path / "image.jpg"
    body.write_bytes(b"\xff\xd8 not decoded here")
    try:
        with pytest.raises(KeyRefused, match="UNAUTHENTICATED") as refused:
            grpc_load.run_load(f"127.0.0.1:{port}", "m", None, (body,), calls=2, seconds=0.5)
    finally:
        server.stop(None)
    assert "CNNSERVE_API_KEYS" in str(refused.value)


def test_grpc_load_spreads_its_calls_over_enough_connections_to_reach_every_worker() -> None:
    """The capacity level's 32 calls came on 2 connections, both on one worker in about
    half the runs (connections stay with the worker the kernel gave them to)."""
    assert grpc_load.connections_for(32) == grpc_load.MIN_CONNECTIONS == 8
    assert grpc_load.connections_for(128) == 8  # 16 a connection
    assert grpc_load.connections_for(512) == 32
    assert grpc_load.connections_for(3) == 3  # a connection each, none idle


def test_a_probe_url_that_answers_nothing_is_refused_before_measuring(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Measured anyway, the report blamed the gateway: readiness not kept, every poll."""
    monkeypatch.setenv("CNNSERVE_API_KEYS", GATEWAY_KEY)
    monkeypatch.delenv("CNNSERVE_API_KEYS_FILE", raising=False)
    with keyed_server() as (url, _), socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        nowhere = f"http://127.0.0.1:{unused.getsockname()[1]}"
        args = ["bench", "--overload", "2,16", "--url", url, "--probe-url", nowhere]
        assert main(args) == 2
    err = capsys.readouterr().err
    assert f"nothing answers GET /healthz at --probe-url {nowhere}" in err
    assert "CNNSERVE_PROBE_PORT" in err


def test_a_generator_process_that_fails_is_named_with_its_stderr() -> None:
    ok = generator_result([sys.executable, "-c", "print('{\"statuses\": {}}')"], 30, "x load")
    assert ok == {"statuses": {}}
    fails = [sys.executable, "-c", "import sys; sys.exit('no server at 127.0.0.1:9')"]
    with pytest.raises(RuntimeError, match=r"the x load failed \(1\): no server at 127.0.0.1:9"):
        generator_result(fails, 30, "x load")
    assert key_refusals({"200": 5, 401: 2, "403": 1, "503": 4}) == {"401": 2, "403": 1}
