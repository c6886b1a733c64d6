"""The locustfile, headless, against real servers: both users make successful calls
and appear in locust's stats, and the thresholds decide the exit status both ways.
No test asserts a timing: the failing run asks for an impossible request rate."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.loadtests import run_loadtest
from tests.helpers.server import Server

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
