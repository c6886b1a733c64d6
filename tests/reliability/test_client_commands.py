"""`cnnserve bench` and `cnnserve verify` against a gateway with API keys and TLS: the
key of their own environment, --ca-cert, and what they say when the scheme is wrong."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import server as server_helpers
from tests.helpers.models import publish_tiny, simple_config, write_models_config
from tests.helpers.server import ROOT, Server, running_server, self_signed

KEY = "client-commands-key"


def cnnserve(*args: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
    # This test's environment, without settings of its own: only the key given here.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNNSERVE_")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if server_helpers.CACHE_DIR is not None:  # conversions in the test run's folder, not ~
        env["CNNSERVE_CACHE_DIR"] = str(server_helpers.CACHE_DIR)
    if key is not None:
        env["CNNSERVE_API_KEYS"] = key
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def bench(server: Server, *args: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
    return cnnserve(
        "bench", "--url", server.url, "--model", "tiny", "--payload", "photos",
        "--concurrency", "2", "--seconds", "1", "--warmup-seconds", "0",
        "--limit-seconds", "0.1", "--no-reference", "--workers", "1", *args, key=key,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_bench_drives_a_gateway_with_keys(tiny_repo: Path, tmp_path: Path) -> None:
    """Every request was a 401, and bench exited 0 with a report of refusals."""
    env = {"CNNSERVE_API_KEYS": f"other,{KEY}", "CNNSERVE_POLL_SECONDS": "0"}
    output = tmp_path / "bench.json"
    repository = ("--model-repository", str(tiny_repo), "--output", str(output))
    with running_server(tiny_repo, env=env) as server:
        done = bench(server, *repository)
        assert done.returncode == 0, done.stderr[-3000:]
        [point] = [p for run in json.loads(output.read_text())["runs"] for p in run["points"]]
        assert set(point["statuses"]) == {"200"} and point["ok"] > 0, point
        for key in ("wrong", None):  # a key the gateway does not know, and none
            refused = bench(server, *repository, key=key)
            assert refused.returncode == 2, refused.stderr[-3000:]
            [line] = refused.stderr.splitlines()
            assert line.startswith(f"cnnserve bench: {server.url} answered 401 to ")
            assert "CNNSERVE_API_KEYS" in line


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_bench_measures_the_version_it_reports(tiny_repo: Path, tmp_path: Path) -> None:
    """bench --url reported the newest version of its --model-repository and took its
    limits from it, while wrk's requests went to whatever the gateway's default route
    served: a gateway on version 1 was reported as version 2 at 27% efficiency."""
    local = tmp_path / "repo"
    shutil.copytree(tiny_repo, local)
    publish_tiny(local, "tiny", seed=1)  # version 2, which the gateway has not
    output = tmp_path / "bench.json"
    repository = ("--model-repository", str(local), "--output", str(output))
    with running_server(tiny_repo, env={"CNNSERVE_API_KEYS": KEY}) as server:
        told = bench(server, *repository)
        assert told.returncode == 2, told.stderr[-3000:]
        assert "does not serve version 2 of tiny (it serves [1])" in told.stderr
        assert not output.exists()
        done = bench(server, *repository, "--version", "1")
        assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["model"] == "tiny/1"
    [point] = [p for run in report["runs"] for p in run["points"]]
    assert set(point["statuses"]) == {"200"} and point["ok"] > 0, point


def test_verify_refuses_to_judge_another_model_than_the_served_one(tmp_path: Path) -> None:
    """A server on another repository's version 1 (its card created at another time):
    verify compared the two models, reported 25% agreement and exited 1, the exit of a
    train/serve skew, which no serving fault caused. Now it says so, exit 2."""
    served, local = tmp_path / "served", tmp_path / "local"
    for repo, created in (
        (served, "2026-01-01T00:00:00+00:00"),
        (local, "2026-02-02T00:00:00+00:00"),
    ):
        publish_tiny(repo, "tiny")
        write_models_config(repo, simple_config("tiny"))
        card_path = repo / "tiny" / "1" / "assets.extra" / "model_card.json"
        card_path.write_text(
            json.dumps(json.loads(card_path.read_text()) | {"created_at": created})
        )
    common = ("--model", "tiny", "--limit", "2", "--output", str(tmp_path / "verify"))
    with running_server(served, env={"CNNSERVE_API_KEYS": KEY}) as server:
        other = cnnserve("verify", "--url", server.url, "--model-repository", str(local), *common)
        assert other.returncode == 2, other.stdout + other.stderr
        assert "serves another tiny version 1 than" in other.stderr
        assert "point --model-repository at the repository the server serves" in other.stderr
        same = cnnserve("verify", "--url", server.url, "--model-repository", str(served), *common)
        assert "serves another" not in same.stderr, same.stderr


def test_bench_and_verify_on_tls(tiny_repo: Path, tmp_path: Path) -> None:
    """bench said "no gateway answers" of a gateway on TLS with its own certificate;
    verify told to give --ca-cert when given it (the port spoke no TLS), and "is the
    server running?" of a TLS port given http://."""
    cert, key = self_signed(tmp_path)
    env = {
        "CNNSERVE_API_KEYS": KEY,
        "CNNSERVE_TLS_CERTFILE": str(cert),
        "CNNSERVE_TLS_KEYFILE": str(key),
        "CNNSERVE_POLL_SECONDS": "0",
    }
    with running_server(tiny_repo, env=env, tls_ca=cert) as server:
        untrusting = bench(server, key="wrong")
        assert untrusting.returncode == 2
        assert "give its certificate with --ca-cert" in untrusting.stderr
        # Trusted: bench reaches the gateway, which refuses the key (401, not "no gateway").
        trusting = bench(server, "--ca-cert", str(cert), key="wrong")
        assert trusting.returncode == 2 and " answered 401 to " in trusting.stderr
        plain_url = f"http://127.0.0.1:{server.port}"
        output = ("--output", str(tmp_path / "verify"), "--limit", "2")
        told = cnnserve("verify", "--url", plain_url, "--model", "tiny", *output)
        assert told.returncode == 2
        assert "if that port speaks TLS, use https://" in told.stderr, told.stderr
        assert "is the server running" not in told.stderr
    with running_server(tiny_repo, env={"CNNSERVE_POLL_SECONDS": "0"}) as plain:
        https_url = f"https://127.0.0.1:{plain.port}"
        trusted = ("--ca-cert", str(cert))
        told = cnnserve("verify", "--url", https_url, "--model", "tiny", *trusted, *output)
        assert told.returncode == 2
        assert "does not speak TLS" in told.stderr and "use http://" in told.stderr
        assert "--ca-cert" not in told.stderr
