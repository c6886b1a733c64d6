"""Start the real Prometheus server (Debian package prometheus) on 127.0.0.1 and query it."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from service.launch import free_port
from tests.helpers.server import stop

SCRAPE_INTERVAL = "1s"


class Prometheus:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query through the HTTP API; a query Prometheus rejects fails the test."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {r.text}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for_data(self, expr: str, deadline: float) -> list[dict[str, Any]]:
        """Poll until ``expr`` returns a non-empty result (scrapes are asynchronous)."""
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.2)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus never became ready:\n{self.log.read_text()}")


@contextmanager
def running_prometheus(
    workdir: Path, *, targets: list[str], rule_files: list[Path]
) -> Iterator[Prometheus]:
    """Prometheus scraping ``targets`` (the gateway's /metrics) every second, with
    ``rule_files`` loaded, its data in ``workdir``."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus not found: install the Debian package (make test does)")
    config = {
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "scrape_timeout": SCRAPE_INTERVAL,
            "evaluation_interval": SCRAPE_INTERVAL,
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": "cnnserve", "static_configs": [{"targets": targets}]}],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    prometheus = Prometheus(process, port, log)
    try:
        prometheus.wait_ready()
        yield prometheus
    finally:
        stop(process)
