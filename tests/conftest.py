"""Fixtures shared by the whole suite. Helpers that are plain functions live in
tests/helpers/ (real servers, tiny models, images, Prometheus, monitoring configs)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.helpers import models as model_helpers
from tests.helpers import server as server_helpers
from tests.helpers.images import encode, gradient
from tests.helpers.models import tiny_repository
from tests.helpers.server import Server, running_server


@pytest.fixture(scope="session", autouse=True)
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Servers' logs go to this run's temporary folder, not /tmp for good."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("server-logs")
        patch.setattr(server_helpers, "LOG_DIR", folder)
        patch.setattr(server_helpers, "CACHE_DIR", tmp_path_factory.mktemp("server-cache"))
        yield folder


@pytest.fixture(scope="session", autouse=True)
def tiny_model_exports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The exports publish_tiny copies (one per distinct version) live in this run's
    temporary folder too."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("tiny-models")
        patch.setattr(model_helpers, "BUILD_DIR", folder)
        yield folder


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository serving one version of model "tiny" (labels cat, dog, bird)."""
    return tiny_repository(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_repo_litert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As ``tiny_repo``, with a verified LiteRT artifact (what production serves)."""
    return tiny_repository(tmp_path_factory.mktemp("tiny-litert"), with_litert=True)


@pytest.fixture
def png() -> bytes:
    """A small PNG whose corners differ."""
    return encode(gradient(), "PNG")


@pytest.fixture
def start_server() -> Iterator[Callable[..., Server]]:
    """Start real `cnnserve serve` processes (ready when returned); all stop after the test."""
    with ExitStack() as stack:

        def start(repository: Path, **kwargs: object) -> Server:
            return stack.enter_context(running_server(repository, **kwargs))  # type: ignore[arg-type]

        yield start
