"""`cnnserve bench` end to end on a tiny model: a sweep of two points on the photo mix,
the limits, both reference servers, the side-by-side ratios, JSON and a PNG. Numbers are
checked for shape, never for speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.server import ROOT

pytestmark = [pytest.mark.load, pytest.mark.slow]


def test_tiny_sweep_writes_json_and_png(tiny_repo: Path, tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "service.cli", "bench"),
            *("--model-repository", str(tiny_repo), "--model", "tiny"),
            *("--concurrency", "1,2", "--workers", "1", "--batching", "4:500:1"),
            *("--payload", "photos"),
            *("--seconds", "1", "--warmup-seconds", "1", "--limit-seconds", "0.5"),
            *("--slo-p99-ms", "60000", "--output", str(output)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.read_text())
    (run,) = data["runs"]
    assert [p["connections"] for p in run["points"]] == [1, 2]
    for point in run["points"]:
        assert point["ok"] > 0 and point["requests_per_s"] > 0
        for key in ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "server_cores", "server_rss_mb"):
            assert point[key] >= 0, key
        assert point["limit_rps"] > 0 and point["efficiency"] > 0
        assert point["cpu_ms_per_request"] > 0 and point["cpu_efficiency"] > 0
        assert point["max_batch_size"] == 4
    assert run["http_alone"]["ok"] > 0
    assert set(data["limits"]["inference_ms_per_image"]) == {"1", "2", "4"}
    assert data["payload"] == "photos" and 8 * 1024 <= data["median_image_bytes"] <= 12 * 1024
    assert [peer["key"] for peer in data["peers"]] == ["reference", "batching_reference"]
    for peer in data["peers"]:
        assert [p["connections"] for p in peer["points"]] == [1, 2], peer.get("error")
        for point in peer["points"]:
            assert point["ok"] > 0 and point["cpu_ms_per_request"] > 0
            assert point["served_batch"] >= 1 and "server_rss_mb" in point
    for row in data["side_by_side"]:
        assert row["vs_reference"] > 0 and row["vs_batching_reference"] > 0
    assert [row["connections"] for row in data["side_by_side"]] == [1, 2]
    assert data["advice"]["meets_slo"]
    assert "max_batch_size { value: 4 }" in data["advice"]["batching_config"]
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| server | conn | req/s" in result.stdout
    assert "| side by side: gateway |" in result.stdout
    assert "[1/1] gateway" in result.stderr  # progress while it runs
