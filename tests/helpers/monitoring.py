"""The monitoring configs shipped in docker/ (Prometheus rules, Grafana dashboard)."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.http_stub import QuietHandler, http_stub

DOCKER = Path(__file__).resolve().parents[2] / "docker"
PROMETHEUS = DOCKER / "prometheus"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "cnnserve.json"


def recording_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "rules" / "recording.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "rules" / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queries += [v["definition"] for v in dashboard["templating"]["list"]]
    return queries


# What TF Serving exports on its REST port with model_repository/monitoring.config
# (tensorflow_serving/servables/tensorflow/util.cc; TensorFlow's exporter turns
# /tensorflow/serving/x into :tensorflow:serving:x, samplers into histograms in µs).
TFSERVING_METRICS = {
    ":tensorflow:serving:request_count": ("counter", ("model_name", "status")),
    ":tensorflow:serving:request_latency": ("histogram", ("model_name", "API", "entrypoint")),
    ":tensorflow:serving:runtime_latency": ("histogram", ("model_name", "API", "runtime")),
}
TFSERVING_METRIC_NAME = re.compile(r":tensorflow:[a-z_:]+")


def tfserving_sample_names() -> set[str]:
    names = set()
    for name, (kind, _) in TFSERVING_METRICS.items():
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        names |= {name + s for s in suffixes}
    return names


def tfserving_exposition(scrape: int, model: str) -> str:
    """TF Serving's metrics page after ``scrape`` predict calls of 2 ms (1 ms runtime)."""
    values = {"model_name": model, "status": "OK", "API": "predict"}
    values |= {"entrypoint": "GRPC", "runtime": "TF1"}
    lines = []
    for name, (kind, labels) in TFSERVING_METRICS.items():
        base = ",".join(f'{k}="{values[k]}"' for k in labels)
        lines.append(f"# TYPE {name} {kind}")
        if kind == "counter":
            lines.append(f"{name}{{{base}}} {scrape}")
            continue
        micros = 2000 if "request" in name else 1000
        for le in (10, 1000, 10_000, "+Inf"):
            count = scrape if le == "+Inf" or float(le) >= micros else 0
            lines.append(f'{name}_bucket{{{base},le="{le}"}} {count}')
        lines.append(f"{name}_sum{{{base}}} {micros * scrape}")
        lines.append(f"{name}_count{{{base}}} {scrape}")
    return "\n".join(lines) + "\n"


@contextmanager
def fake_tfserving_metrics(model: str) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering every GET with ``tfserving_exposition``, one
    more call per scrape; yields its host:port for Prometheus' targets."""
    scrapes = itertools.count(1)

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            body = tfserving_exposition(next(scrapes), model).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with http_stub(Handler) as url:
        yield url.removeprefix("http://")
