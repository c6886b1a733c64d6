"""The locustfile, headless, against real servers: both users make successful calls
and appear in locust's stats, and the thresholds decide the exit status both ways.
No test asserts a timing: the failing run asks for an impossible request rate."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from service.launch import free_port
from tests.helpers.loadtests import run_loadtest
from tests.helpers.server import Server, eventually, workers_of

pytestmark = [pytest.mark.load, pytest.mark.slow]


def stats_rows(reports: Path, protocol: str) -> dict[str, dict[str, str]]:
    with (reports / f"locust-{protocol}_stats.csv").open() as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def test_rest_and_grpc_users_pass_their_thresholds(
    tiny_repo: Path, start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = start_server(tiny_repo, grpc_port=0)
    result = run_loadtest(
        *("--host", server.url, "--grpc-host", server.grpc_target, "--protocol", "mixed"),
        *("--model", "tiny", "--users", "4", "--spawn-rate", "4", "--duration", "6s"),
        *("--target-rps", "1", "--max-p99-ms", "60000", "--max-fail-ratio", "0"),
        *("--reports", str(tmp_path)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loadtest PASSED" in result.stderr
    rows = stats_rows(tmp_path, "mixed")
    for name in (
        "/v1/classify [raw]",
        "/tensorflow.serving.PredictionService/Predict",
        "/cnnserve.v1.ImageClassifier/Classify",
    ):
        assert int(rows[name]["Request Count"]) > 0, name
        assert rows[name]["Failure Count"] == "0", name
    assert int(rows["Aggregated"]["Request Count"]) > 0
    assert (tmp_path / "locust-mixed.html").stat().st_size > 0


def test_a_broken_threshold_fails_with_a_one_line_reason(tiny_repo: Path, tmp_path: Path) -> None:
    # No --host: the runner starts a server itself (and stops it after).
    result = run_loadtest(
        *("--model-repository", str(tiny_repo), "--model", "tiny", "--protocol", "rest"),
        *("--users", "2", "--spawn-rate", "2", "--duration", "3s"),
        *("--target-rps", "1000000000", "--reports", str(tmp_path)),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "started a local server" in result.stderr
    lines = [line for line in result.stderr.splitlines() if "loadtest FAILED" in line]
    assert len(lines) == 1 and "< TARGET_RPS 1e+09" in lines[0]
    assert int(stats_rows(tmp_path, "rest")["Aggregated"]["Request Count"]) > 0


def test_a_dead_rest_port_fails_a_mixed_run_its_grpc_users_passed(
    tiny_repo: Path, start_server: Callable[..., Server], tmp_path: Path
) -> None:
    """No answer is a failure, not a task error locust leaves out: a refused REST
    connection (while gRPC answers) passed a run with --max-fail-ratio 0. The host's
    trailing slash is dropped (it made every path '//v1/classify')."""
    server = start_server(tiny_repo, grpc_port=0)
    dead = f"http://127.0.0.1:{free_port()}/"
    result = run_loadtest(
        *("--host", dead, "--grpc-host", server.grpc_target, "--protocol", "mixed"),
        *("--model", "tiny", "--users", "2", "--spawn-rate", "2", "--duration", "3s"),
        *("--max-fail-ratio", "0", "--reports", str(tmp_path)),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if "loadtest FAILED" in line]
    assert "failure ratio" in line and "bounds TARGET_RPS off" in line
    rows = stats_rows(tmp_path, "mixed")
    assert int(rows["/v1/classify [raw]"]["Failure Count"]) > 0
    assert rows["/cnnserve.v1.ImageClassifier/Classify"]["Failure Count"] == "0"
    verdict = json.loads((tmp_path / "locust-mixed_verdict.json").read_text())
    assert verdict["passed"] is False and verdict["bounds"]["max_fail_ratio"] == 0


def test_keys_reach_both_protocols_and_a_trailing_slash_is_dropped(
    tiny_repo: Path, start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = start_server(tiny_repo, grpc_port=0, env={"CNNSERVE_API_KEYS": "k1"})
    result = run_loadtest(
        *("--host", server.url + "/", "--grpc-host", server.grpc_target, "--protocol", "mixed"),
        *("--model", "tiny", "--users", "2", "--spawn-rate", "2", "--duration", "3s"),
        *("--api-key", "k1", "--max-fail-ratio", "0", "--reports", str(tmp_path)),
        *("--encoding-mix", "raw:1,tfserving:1"),  # TF Serving's REST :predict too
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = stats_rows(tmp_path, "mixed")
    assert int(rows["/v1/models/tiny:predict"]["Request Count"]) > 0
    verdict = json.loads((tmp_path / "locust-mixed_verdict.json").read_text())
    assert verdict["passed"] is True and verdict["requests"] > 0


@pytest.mark.parametrize(
    "option", [("--target-rps", "nan"), ("--max-p99-ms", "-5"), ("--max-fail-ratio", "5")]
)
def test_a_bound_that_means_nothing_is_refused(option: tuple[str, str]) -> None:
    result = run_loadtest(*option, "--host", "http://127.0.0.1:1", timeout=60)
    assert result.returncode == 2 and option[0] in result.stderr, result.stderr[-2000:]


def test_a_local_server_that_does_not_start_says_why(tmp_path: Path) -> None:
    earlier = tmp_path / "locust-rest_verdict.json"
    earlier.write_text('{"passed": true}')  # an earlier run's: it must not stand
    result = run_loadtest(
        "--model-repository", str(tmp_path / "nowhere"), "--reports", str(tmp_path), timeout=120
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert json.loads(earlier.read_text())["passed"] is False
    assert "the local server did not start" in result.stderr
    assert "models.config" in result.stderr  # the server's own reason


def test_a_server_that_hangs_midway_fails_the_run(
    tiny_repo: Path, start_server: Callable[..., Server], tmp_path: Path
) -> None:
    """Its answers before it hung kept the failure ratio low (one timeout per user per
    REQUEST_TIMEOUT): any request without an answer in time fails the run."""
    server = start_server(tiny_repo)
    frozen: list[int] = []

    def freeze_once_answering() -> None:
        eventually(lambda: 'route="/v1/classify"' in httpx.get(server.url + "/metrics").text)
        for pid in [server.process.pid, *workers_of(server)]:
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)

    freezer = threading.Thread(target=freeze_once_answering)
    freezer.start()
    try:
        result = run_loadtest(
            *("--host", server.url, "--model", "tiny", "--users", "2", "--spawn-rate", "2"),
            *("--duration", "6s", "--request-timeout", "1", "--max-fail-ratio", "0.5"),
            *("--reports", str(tmp_path)),
        )
    finally:
        freezer.join(timeout=60)
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert frozen, "the server never answered"
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if "loadtest FAILED" in line]
    assert "had no answer within 1 s" in line
