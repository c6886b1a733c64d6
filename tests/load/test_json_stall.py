"""loadtests/json_stall.py against a real gateway: the measurement behind
docs/failure-modes.md's "large JSON bodies at once"."""

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


def test_each_body_is_answered_and_the_polls_beside_it_are_counted(
    tiny_repo: Path, start_server: Callable[..., Server]
) -> None:
    server = start_server(tiny_repo)
    command = [sys.executable, str(LOADTESTS / "json_stall.py"), server.url, "--model", "tiny"]
    command += ["--images", "2", "--rounds", "3", "--floats"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["images"] == 2 and result["body_bytes"] > 1_000_000  # two images of floats
    assert len(result["predict_s"]) == 3 and result["predict_median_s"] > 0
    assert result["polls"] >= 1
    assert result["poll_p50_ms"] <= result["poll_p99_ms"] <= result["poll_longest_ms"]


def test_the_bodies_are_pixel_lists_of_as_many_different_images() -> None:
    body = json.loads(load_module("json_stall").pixel_body(3, floats=False))
    images = body["instances"]
    shape = [len(images), len(images[0]), len(images[0][0]), len(images[0][0][0])]
    assert shape == [3, 224, 224, 3]
    assert images[0] != images[1] and all(isinstance(v, int) for v in images[2][5][7])


@pytest.mark.parametrize("bad", [["--images", "0"], ["--rounds", "0"], ["--every", "0"]])
def test_options_that_send_nothing_are_refused(
    bad: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    stall = load_module("json_stall")
    with pytest.raises(SystemExit) as stopped:
        stall.main(["http://127.0.0.1:1", *bad])
    assert stopped.value.code == 2
    assert "must be" in capsys.readouterr().err
