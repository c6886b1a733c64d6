"""Every test in this folder drives a real `cnnserve serve` and is marked `reliability`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.helpers.server import Server, running_server

# Hypothesis budgets: short in CI (the default), long for `make fuzz`.
settings.register_profile("ci", max_examples=25, print_blob=True)
settings.register_profile("fuzz", max_examples=2000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/reliability/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.reliability)


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[Server]:
    """One server (REST and gRPC, poll off) shared by a module's tests; short header and
    body read timeouts so slow-client tests finish fast."""
    env = {
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_BODY_READ_TIMEOUT_SECONDS": "1",
        "CNNSERVE_HEADER_READ_TIMEOUT_SECONDS": "1",
    }
    with running_server(tiny_repo, grpc_port=0, env=env) as started:
        yield started
