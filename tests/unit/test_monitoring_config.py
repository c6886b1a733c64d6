"""docker/'s Prometheus and Grafana files: valid for their tools, and built only from
names service/metrics.py exports. (Whether each query returns data is checked against a
real Prometheus in tests/integration/test_observability.py.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from service import metrics
from tests.helpers.monitoring import (
    DASHBOARD,
    DOCKER,
    PROMETHEUS,
    TFSERVING_METRIC_NAME,
    alert_rules,
    dashboard_queries,
    recording_rules,
    tfserving_sample_names,
)

METRIC_NAME = re.compile(r"\bcnnserve_[a-z0-9_]+\b")


def promtool(*args: str) -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool not found: install the Debian package prometheus (make test does)")
    done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def exported_names() -> set[str]:
    """Every sample name the gateway can expose."""
    names = set()
    for obj in vars(metrics).values():
        if isinstance(obj, Counter):
            names.add(f"{obj._name}_total")
        elif isinstance(obj, Histogram):
            names |= {f"{obj._name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        elif isinstance(obj, Gauge):
            names.add(obj._name)
        elif isinstance(obj, metrics.WrittenOnSet):  # a Gauge once a worker sets it
            names.add(obj.name)
    return names


def test_prometheus_config_and_rules_pass_promtool() -> None:
    promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    out = promtool("check", "rules", *map(str, sorted((PROMETHEUS / "rules").glob("*.yml"))))
    assert "SUCCESS" in out


def test_alerts_fire_on_their_unit_test_series() -> None:
    promtool("test", "rules", str(PROMETHEUS / "tests" / "alerts_test.yml"))


def test_prometheus_scrapes_the_gateway_and_tf_serving_metrics_paths() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    paths = {job["job_name"]: job["metrics_path"] for job in config["scrape_configs"]}
    monitoring = (DOCKER.parent / "model_repository" / "monitoring.config").read_text()
    tfserving_path = re.search(r'path:\s*"([^"]+)"', monitoring)
    assert tfserving_path is not None
    assert paths == {"cnnserve": "/metrics", "tfserving": tfserving_path.group(1)}


def test_the_gateway_is_scraped_on_the_probe_port_make_run_and_the_image_open() -> None:
    """Not the REST port: under an overload a scrape on a new connection there waits
    behind every connection queued (an open loop at 4x: 8 of 10 polls failed there, none
    on the probe port), and Prometheus lost the samples of the minutes it was needed."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "cnnserve"]
    ports = {target.rsplit(":", 1)[1] for c in job["static_configs"] for target in c["targets"]}
    image = re.search(r"CNNSERVE_PROBE_PORT=(\d+)", (DOCKER / "Dockerfile").read_text())
    make_run = re.search(
        r"^run:.*\n\t.*cnnserve serve --probe-port \$\$\{CNNSERVE_PROBE_PORT:-(\d+)\}",
        (DOCKER.parent / "Makefile").read_text(),
        re.M,
    )
    gateway = yaml.safe_load((DOCKER / "compose.yaml").read_text())["x-gateway"]
    assert image is not None and make_run is not None
    assert ports == {image.group(1)} == {make_run.group(1)}
    assert f"127.0.0.1:{image.group(1)}:{image.group(1)}" in gateway["ports"]


@pytest.mark.parametrize(
    "expr",
    [r["expr"] for r in recording_rules() + alert_rules()] + dashboard_queries(),
)
def test_every_query_uses_exported_metric_names(expr: str) -> None:
    # Recorded series (level:metric:operations) are checked by the next test.
    for name in sorted((r["record"] for r in recording_rules()), key=len, reverse=True):
        expr = expr.replace(name, "")
    unknown = set(METRIC_NAME.findall(expr)) - exported_names()
    assert not unknown, f"not exported by service/metrics.py: {unknown}"


def test_alerts_use_only_recorded_series_that_exist() -> None:
    recorded = {r["record"] for r in recording_rules()}
    for rule in alert_rules():
        for name in re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", rule["expr"]):
            assert name in recorded, f"{rule['alert']} uses {name}, which no rule records"


def test_dashboard_uses_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    uids = {d["uid"] for d in provisioned}
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "cnnserve"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"]["uid"] in uids for t in panel["targets"]), panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_compose_mounts_exist_and_match_the_provisioning() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
    providers = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "dashboards" / "cnnserve.yml").read_text()
    )["providers"]
    grafana_mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert grafana_mounts["./grafana/dashboards"] == providers[0]["options"]["path"]


def test_dashboard_shows_tf_serving_metrics_by_the_names_it_exports() -> None:
    used = {name for expr in dashboard_queries() for name in TFSERVING_METRIC_NAME.findall(expr)}
    assert used, "no TF Serving panel"
    assert used <= tfserving_sample_names(), used - tfserving_sample_names()
    # TF Serving labels its series model_name (the gateway: model); the $model variable
    # must filter them too.
    for expr in dashboard_queries():
        if TFSERVING_METRIC_NAME.search(expr):
            assert 'model_name=~"$model"' in expr and 'model=~"$model"' not in expr, expr
