"""Metrics, access log and monitoring config against a real gateway with two worker
processes and the real Prometheus server scraping it."""

from __future__ import annotations

import base64
import calendar
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from service.launch import free_port
from service.proto_gen import cnnserve_v1_pb2, cnnserve_v1_pb2_grpc
from service.siblings import COLUMNS, TABLE
from tests.helpers.images import encode, gradient
from tests.helpers.monitoring import (
    DASHBOARD,
    PROMETHEUS,
    fake_tfserving_metrics,
    recording_rules,
)
from tests.helpers.prometheus import running_prometheus
from tests.helpers.server import Server, running_server

pytestmark = pytest.mark.slow

# What Grafana would put in for the dashboard's variables.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".+"}
WORKERS = 2
AVAILABLE = frozenset({"model": "tiny", "version": "1", "state": "AVAILABLE"}.items())


@pytest.fixture(scope="module")
def repository(tiny_repo: Path) -> Path:
    return tiny_repo


@pytest.fixture(scope="module")
def probe_port() -> int:
    """The gateway's probe port, where docker/prometheus/prometheus.yml scrapes it."""
    return free_port()


@pytest.fixture(scope="module")
def server(repository: Path, probe_port: int) -> Iterator[Server]:
    args = ("--poll-seconds", "0", "--workers", str(WORKERS), "--probe-port", str(probe_port))
    rest_port = next(p for p in iter(free_port, None) if p != probe_port)
    with running_server(repository, args=args, port=rest_port) as srv:
        # /readyz says 200 only once every worker is ready (service.readiness), so the
        # summed metrics already show the version AVAILABLE in each of them.
        assert samples(srv).get(("cnnserve_model_versions", AVAILABLE)) == WORKERS
        yield srv
    # Stopped: the workers' metric files went with their folder.
    assert not metrics_dir(srv).exists()


def metrics_dir(server: Server) -> Path:
    found = re.search(r"write their metrics to (\S+) ", server.log.read_text())
    assert found is not None, server.log.read_text()
    return Path(found.group(1))


def samples(server: Server) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body = httpx.get(server.url + "/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def access_line(server: Server, request_id: str, timeout: float = 10) -> dict[str, Any]:
    """The JSON access-log line of one request (written just after the response)."""
    marker = f'"request_id":"{request_id}"'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log.read_text().splitlines():
            if marker in line:
                parsed: dict[str, Any] = json.loads(line)
                return parsed
        time.sleep(0.05)
    raise AssertionError(f"no access-log line for {request_id}:\n{server.log.read_text()}")


def drive_load(client: httpx.Client) -> None:
    """Successes on both REST APIs, client errors, and requests naming unknown things."""
    png = encode(gradient(), "PNG")
    b64 = base64.b64encode(png).decode()
    for _ in range(12):
        r = client.post("/v1/classify", content=png, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
    for _ in range(3):
        r = client.post(
            "/v1/models/tiny:predict",
            json={"signature_name": "predict_image_bytes", "instances": [{"b64": b64}] * 2},
        )
        assert r.status_code == 200, r.text
    headers = {"content-type": "image/png"}
    statuses = [
        client.post("/v1/classify", content=b"not an image", headers=headers),
        client.post("/v1/classify?top_k=99", content=png, headers=headers),
        client.post("/v1/classify?model=garbage-model-1", content=png, headers=headers),
        client.get("/v1/models/garbage-model-2"),
        client.get("/garbage-path-3/x"),
    ]
    assert [r.status_code for r in statuses] == [400, 400, 404, 404, 404]


@pytest.fixture(scope="module")
def loaded(server: Server) -> Server:
    with server.client() as client:
        drive_load(client)
    return server


def test_request_id_is_honoured_and_logged_without_image_bytes(server: Server) -> None:
    png = encode(gradient(), "PNG")
    payload = base64.b64encode(png).decode()
    with server.client() as client:
        r = client.post(
            "/v1/classify", json={"image": payload}, headers={"x-request-id": "trace-obs-1"}
        )
        bad = client.post(
            "/v1/classify",
            content=b"junk",
            headers={"content-type": "image/png", "x-request-id": "trace-obs-2"},
        )
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-obs-1"
    assert bad.status_code == 400 and bad.headers.get_list("x-request-id") == ["trace-obs-2"]
    assert set(re.findall(r"(\w+);dur=", r.headers["server-timing"])) == {
        "decode",
        "queue_wait",
        "inference",
        "encode",
    }
    line = access_line(server, "trace-obs-1")
    assert line["method"] == "POST" and line["route"] == "/v1/classify"
    assert (line["status"], line["model"], line["version"], line["protocol"]) == (
        200,
        "tiny",
        1,
        "rest",
    )
    assert line["duration_ms"] > 0
    assert set(line["timings_ms"]) == {"decode", "queue_wait", "inference", "encode"}
    assert sum(line["timings_ms"].values()) <= line["duration_ms"]
    failed = access_line(server, "trace-obs-2")
    assert (failed["status"], failed["model"]) == (400, "tiny")
    log = server.log.read_text()
    assert payload[:64] not in log and "junk" not in log


def test_request_id_is_made_up_when_missing(server: Server) -> None:
    r = httpx.get(server.url + "/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    assert access_line(server, r.headers["x-request-id"])["route"] == "/healthz"


def test_workers_share_their_places_in_the_runs_table(server: Server) -> None:
    """Each worker took a slot in the table service.siblings keeps in the run's folder
    and published its concurrency limit there: what a worker at its own limit borrows
    from. The table's sum is what the summed limit gauge says."""
    table = np.fromfile(metrics_dir(server) / "siblings" / TABLE, dtype=np.int64)
    in_flight, limits = table.reshape(-1, COLUMNS).T[:2]
    assert (limits > 0).sum() == WORKERS, table
    assert in_flight.sum() == 0  # the scrape below is not a limited request
    gauge = frozenset[tuple[str, str]]()
    assert samples(server)[("cnnserve_concurrency_limit", gauge)] == limits.sum()


def test_an_embedded_gateways_backend_reads_up(server: Server) -> None:
    """Its runtime is in the process: cnnserve_backend_up is 1 (it read 0, which the
    backend-down alert would take for a TF Serving out of reach)."""
    assert samples(server)[("cnnserve_backend_up", frozenset())] == 1


def test_worker_processes_are_summed_and_labels_stay_bounded(loaded: Server) -> None:
    before = samples(loaded)
    with loaded.client() as client:
        for _ in range(7):
            assert client.get("/v1/models/tiny/metadata").status_code == 200
    after = samples(loaded)
    key = frozenset(
        {
            "protocol": "rest",
            "route": "/v1/models/{model}/metadata",
            "model": "tiny",
            "version": "1",
            "code": "200",
        }.items()
    )
    name = "cnnserve_requests_total"
    assert after[(name, key)] - before.get((name, key), 0) == 7
    assert after[("cnnserve_model_versions", AVAILABLE)] == WORKERS  # summed over workers
    body = httpx.get(loaded.url + "/metrics").text
    assert "garbage" not in body  # unknown models and paths add no label values
    routes = {dict(labels)["route"] for metric, labels in after if metric == name}
    assert "unmatched" in routes and all(r == "unmatched" or r.startswith("/") for r in routes)


def test_every_dashboard_panel_and_recording_rule_has_data(
    loaded: Server, probe_port: int, tmp_path: Path
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {
        f"panel {panel['title']!r} {target['refId']}": target["expr"]
        for panel in dashboard["panels"]
        for target in panel["targets"]
    }
    for name, expr in list(queries.items()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        queries[name] = expr
    for rule in recording_rules():
        queries[f"rule {rule['record']} (expr)"] = rule["expr"]
        queries[f"rule {rule['record']} (recorded)"] = rule["record"]
    rule_files = sorted((PROMETHEUS / "rules").glob("*.yml"))
    # On the probe port, as the shipped scrape config: every worker's series, summed.
    target = f"127.0.0.1:{probe_port}"
    # TF Serving's panels read its metrics page, played here by a stand-in in its format.
    with (
        fake_tfserving_metrics("tiny") as tfserving,
        running_prometheus(
            tmp_path, targets=[target, tfserving], rule_files=rule_files
        ) as prometheus,
    ):
        deadline = time.monotonic() + 90
        # Two scrapes after the load, so every rate() has a difference to work with.
        assert prometheus.wait_for_data("count_over_time(up[1m]) >= 2", deadline)
        with loaded.client() as client:
            drive_load(client)
        empty = [
            name for name, expr in queries.items() if not prometheus.wait_for_data(expr, deadline)
        ]
        # Alerts on files the gateway reads stay quiet on one that reads none: their
        # gauges read 0 while unset, and CnnserveApiKeysFileUnreadable was pending on
        # every gateway without a key file.
        states = alert_states(prometheus.url, after=time.time(), deadline=deadline)
    assert not empty, f"no data for: {empty}"
    for name in FILE_ALERTS:
        assert states[name] == "inactive", states


# Alerts on the files a gateway reads (models.config, the API key file, TLS).
FILE_ALERTS = (
    "CnnserveModelsConfigRefused",
    "CnnserveApiKeysFileUnreadable",
    "CnnserveTlsFilesUnreadable",
    "CnnserveTlsCertificateExpiresSoon",
)


def alert_states(url: str, *, after: float, deadline: float) -> dict[str, str]:
    """Each alert rule's state, once every one was evaluated after ``after`` (Unix time)."""
    while True:
        body = httpx.get(f"{url}/api/v1/rules", params={"type": "alert"}, timeout=10).json()
        rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
        evaluated = [
            calendar.timegm(time.strptime(rule["lastEvaluation"][:19], "%Y-%m-%dT%H:%M:%S"))
            for rule in rules
        ]
        if rules and min(evaluated) > after + 1:  # second precision here: one to spare
            return {rule["name"]: rule["state"] for rule in rules}
        assert time.monotonic() < deadline, "the alert rules were never evaluated"
        time.sleep(0.2)


def test_one_worker_metrics_path_is_configurable_and_leaves_no_files(repository: Path) -> None:
    env = {"CNNSERVE_METRICS_PATH": "/internal/metrics"}
    with running_server(repository, env=env, args=("--poll-seconds", "0")) as srv:
        assert httpx.get(srv.url + "/metrics").status_code == 404
        body = httpx.get(srv.url + "/internal/metrics").text
        assert 'cnnserve_model_versions{model="tiny",state="AVAILABLE",version="1"} 1.0' in body
        directory = metrics_dir(srv)
        assert any(directory.glob("*.db"))
    assert not directory.exists()


def test_each_answered_request_is_one_observation_of_every_stage(tiny_repo: Path) -> None:
    """REST and gRPC answers alike: decode, queue wait, inference and encode each count
    the request once (gRPC answers had no encode stage, so the stage means no longer
    added up to the request mean once gRPC traffic was served)."""
    png = encode(gradient(), "PNG")
    with running_server(tiny_repo, grpc_port=0) as srv, srv.channel() as channel:
        before = samples(srv)
        with srv.client() as client:
            for _ in range(3):
                r = client.post("/v1/classify", content=png, headers={"content-type": "image/png"})
                assert r.status_code == 200, r.text
        classifier = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
        for _ in range(4):
            classifier.Classify(cnnserve_v1_pb2.ClassifyRequest(image=png), timeout=30)
        classifier.ClassifyBatch(cnnserve_v1_pb2.ClassifyBatchRequest(images=[png] * 2), timeout=30)
        after = samples(srv)

    def count(stage: str) -> float:
        key = (
            "cnnserve_stage_duration_seconds_count",
            frozenset({"model": "tiny", "stage": stage}.items()),
        )
        return after.get(key, 0) - before.get(key, 0)

    assert {stage: count(stage) for stage in metrics.STAGES} == dict.fromkeys(metrics.STAGES, 8)
