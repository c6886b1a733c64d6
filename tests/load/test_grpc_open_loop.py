"""loadtests/grpc_open_loop.py against a real gateway: the gRPC open loop behind
docs/failure-modes.md's "Open loops over gRPC"."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.loadtests import LOADTESTS, load_module
from tests.helpers.server import ROOT, Server

pytestmark = [pytest.mark.load, pytest.mark.slow]


def test_calls_go_at_the_rate_asked_and_every_one_is_counted(
    tiny_repo: Path, start_server: Callable[..., Server], png: bytes, tmp_path: Path
) -> None:
    server = start_server(tiny_repo, grpc_port=0)
    image = tmp_path / "a.png"
    image.write_bytes(png)
    command = [sys.executable, str(LOADTESTS / "grpc_open_loop.py"), server.grpc_target]
    command += ["--model", "tiny", "--rate", "40", "--seconds", "1", "--connections", "3"]
    done = subprocess.run(
        [*command, str(image)], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["sent"] == 40  # one each 25 ms for 1 s, whatever the answers took
    assert 30 <= result["rate_kept"] <= 45
    assert result["statuses"] == {"OK": 40}  # a tiny model at 40 a second: all served
    assert result["ok_p50_ms"] is not None and result["ok_p50_ms"] <= result["ok_p99_ms"]
    assert result["refused_p50_ms"] is None and result["most_outstanding"] >= 1


@pytest.mark.parametrize(
    "bad",
    [["--rate", "0"], ["--rate", "5", "--connections", "0"], ["--rate", "5", "--timeout", "-1"]],
)
def test_options_that_send_nothing_are_refused(
    bad: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    open_loop = load_module("grpc_open_loop")
    with pytest.raises(SystemExit) as stopped:
        open_loop.main(["127.0.0.1:1", "image.png", *bad])
    assert stopped.value.code == 2
    assert "must be positive" in capsys.readouterr().err
