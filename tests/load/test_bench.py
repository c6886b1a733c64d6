"""`cnnserve bench` end to end on a tiny model: a sweep of two points on the photo mix,
the limits, both reference servers, the side-by-side ratios, JSON and a PNG. Numbers are
checked for shape, never for speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.server import ROOT

pytestmark = [pytest.mark.load, pytest.mark.slow]


def bench(tiny_repo: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """`cnnserve bench` on the tiny model, as a person runs it."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "service.cli", "bench"),
            *("--model-repository", str(tiny_repo), "--model", "tiny", "--workers", "1"),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ | (env or {}),
    )


def test_tiny_sweep_writes_json_and_png(tiny_repo: Path, tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    result = bench(
        tiny_repo,
        *("--concurrency", "1,2", "--batching", "4:500:1", "--payload", "photos"),
        *("--seconds", "1", "--warmup-seconds", "1", "--limit-seconds", "0.5"),
        *("--slo-p99-ms", "60000", "--output", str(output)),
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


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_overload_check_reports_each_target(tiny_repo: Path, tmp_path: Path, protocol: str) -> None:
    """`cnnserve bench --overload` on a worker capped at 2 requests: at 16 connections
    (or calls in flight, over gRPC) it sheds, and the report has every level's target
    rows, the clients' timelines, the readiness polls and the server's memory, as JSON,
    a table and a PNG. Over REST, an open loop follows at 4x the capacity measured."""
    output = tmp_path / "overload.json"
    result = bench(
        tiny_repo,
        *("--overload", "2,16", "--seconds", "2", "--warmup-seconds", "1"),
        *("--output", str(output), "--protocol", protocol),
        *(("--open-loop", "4") if protocol == "rest" else ()),
        env={"CNNSERVE_MAX_CONCURRENT_REQUESTS": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.read_text())
    assert data["capacity"]["connections"] == 2 and data["capacity"]["ok"] > 0
    assert data["unloaded"]["p99_ms"] > 0
    level, *opened = data["levels"]
    if protocol == "rest":
        check_open_loop_level(data, *opened)
        assert f"| {opened[0]['label']} | the generator kept the rate |" in result.stdout
        assert "overload: an open loop at 4x capacity" in result.stderr
    else:
        assert not opened
    assert level["connections"] == 16
    assert set(level["wrk"]["statuses"]) == {"200", "503"}  # shed, and nothing else
    assert level["readiness"]["polls"] > 0 and level["readiness"]["not_ready"] == 0
    # Polled on the probe port of the gateway it started, as docker/k8s probes it, and
    # on the REST port beside it.
    assert level["readiness"]["url"] != data["url"] and level["readiness_rest_port"]["polls"]
    # What the server made of the load: its pace check's verdicts over the level.
    verdicts = {"open_loop", "closed_loop", "many_refusals"}
    assert set(level["pace_checks"]) == verdicts, level["pace_checks"]
    assert level["rss_mb"]["first"] > 0 and level["timeline"]["probe"]
    assert level["recovery"]["ok"] > level["recovery"]["answers"] / 2  # served again
    rows = {t["target"]: t for t in data["targets"] if t["connections"] == 16}
    assert len(rows) == 8 and {t["level"] for t in rows.values()} == {level["label"]}
    assert rows["only 200s and 503s"]["met"] is True
    assert rows["readiness kept"]["met"] is True
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    unit = "calls in flight" if protocol == "grpc" else "connections"
    assert data["protocol"] == protocol and data["level_unit"] == unit
    assert f"| {unit} | target | met | measured |" in result.stdout
    assert "targets met:" in result.stdout
    load = "gRPC load at 16 calls in flight (8 connections)" if protocol == "grpc" else "wrk"
    assert f"overload: {load}" in result.stderr  # progress while it runs


def check_open_loop_level(data: dict[str, Any], level: dict[str, Any]) -> None:
    """Requests sent at four times the goodput measured, whatever the answers took:
    judged on the load's own 503s and on whether the generator kept that rate, beside
    the usual targets."""
    rate = level["open_loop"]["rate"]
    assert level["connections"] is None and level["open_loop"]["multiple"] == 4
    assert rate == pytest.approx(4 * data["capacity"]["requests_per_s"], rel=0.01)
    load = level["wrk"]
    assert load["rate"] == rate and load["requests"] == round(rate * 2)
    assert load["connections_opened"] >= 1 and set(load["statuses"]) <= {"200", "503"}
    rows = {t["target"]: t for t in data["targets"] if t["level"] == level["label"]}
    assert len(rows) == 10 and all(t["connections"] is None for t in rows.values())
    assert rows["503 p50 <= 10 ms (open-loop load)"]["met"] in (True, False)
    assert rows["the generator kept the rate"]["measured"].startswith("sent ")


def test_options_for_another_mode_or_protocol_are_refused_before_measuring(
    tiny_repo: Path,
) -> None:
    """Refused before anything is started or measured."""
    https = ("--url", "https://127.0.0.1:9", "--grpc-target", "127.0.0.1:9")
    cases = [
        (
            ("--overload", "2,16", "--protocol", "grpc", "--url", "http://127.0.0.1:9"),
            "needs --grpc-target HOST:PORT",
        ),
        (("--protocol", "grpc"), "--protocol grpc is for --overload"),
        (
            ("--overload", "2,16", "--grpc-target", "127.0.0.1:9"),
            "--grpc-target is the --url gateway's gRPC port",
        ),
        (("--open-loop", "4"), "--open-loop is for --overload"),
        (
            ("--overload", "2,16", "--probe-url", "http://127.0.0.1:9"),
            "--probe-url is for --overload with --url",
        ),
        (
            ("--overload", "2", "--open-loop", "4", "--protocol", "grpc"),
            "--open-loop sends REST requests",
        ),
        (("--overload", "2", "--open-loop", "1"), "each must be above 1 and at most 1000"),
        (("--overload", "2", "--open-loop", "1e308"), "each must be above 1 and at most 1000"),
        (("--overload", "2"), "at least one higher one, e.g. 32,128, or --open-loop"),
        (("--overload", "2,16", "--protocol", "grpc", *https), "plaintext gRPC"),
    ]
    for args, said in cases:
        result = bench(tiny_repo, *args)
        assert result.returncode == 2, args
        assert said in result.stderr, (args, result.stderr)
