"""Routing during a rollout: the canary traffic split, and labels that move only once
their version serves (in-process registry on real tiny models)."""

from __future__ import annotations

import asyncio
import math
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from service import metrics
from service.registry import Registry
from service.requestlog import RequestRecord, recording
from service.routing import TrafficSplit
from service.runtimes import create_runtime
from service.runtimes.base import Runtime
from tests.helpers.core import run_with, settings
from tests.helpers.models import publish_tiny, write_models_config

CONFIG = (
    'config {{ name: "m" base_path: "/models/m" model_platform: "tensorflow" '
    "model_version_policy {{ specific {{ {versions} }} }} {labels} }}"
)


def config(versions: list[int], labels: dict[str, int]) -> str:
    return CONFIG.format(
        versions=" ".join(f"versions: {v}" for v in versions),
        labels=" ".join(f'version_labels {{ key: "{k}" value: {v} }}' for k, v in labels.items()),
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return publish_tiny(tmp_path_factory.mktemp("template"), "m")


def repository(tmp_path: Path, template: Path, versions: int) -> Path:
    repo = tmp_path / "repo"
    for v in range(1, versions + 1):
        shutil.copytree(template, repo / "m" / str(v))
    return repo


def bounds(n: int, p: float, sigmas: float = 4.5) -> tuple[float, float]:
    """Where a binomial share lands but for about one run in 300,000."""
    spread = sigmas * math.sqrt(p * (1 - p) / n)
    return p - spread, p + spread


def test_the_split_share_is_within_statistical_bounds_keyed_or_not() -> None:
    split = TrafficSplit(0.05)
    n = 40_000
    keyed = sum(split.to_canary("m", f"client-{i}") for i in range(n)) / n
    drawn = sum(split.to_canary("m", None) for _ in range(n)) / n
    low, high = bounds(n, 0.05)
    assert low < keyed < high and low < drawn < high
    assert not any(TrafficSplit(0.0).to_canary("m", f"c{i}") for i in range(1000))
    assert all(TrafficSplit(1.0).to_canary("m", f"c{i}") for i in range(1000))


def test_a_request_without_a_key_is_drawn_once() -> None:
    """Its room checks and its inference look the version up apart: all on one side,
    while requests still split by the share."""
    split = TrafficSplit(0.5)
    sides = []
    for i in range(2000):
        with recording(RequestRecord(request_id=f"r{i}", protocol="http", method="POST")):
            first = split.to_canary("m", None)
            assert all(split.to_canary("m", None) == first for _ in range(5))
            sides.append(first)
    low, high = bounds(len(sides), 0.5)
    assert low < sum(sides) / len(sides) < high


def test_a_client_key_sticks_to_one_side() -> None:
    split = TrafficSplit(0.3)
    for i in range(200):
        first = split.to_canary("m", f"user-{i}")
        assert all(split.to_canary("m", f"user-{i}") == first for _ in range(5))
    # Keyed per model: one client is not on the canary of every model at once.
    same = sum(split.to_canary("a", f"u{i}") == split.to_canary("b", f"u{i}") for i in range(2000))
    assert same < 2000 * 0.7


@pytest.mark.slow
def test_unlabelled_requests_split_between_stable_and_canary(
    template: Path, tmp_path: Path
) -> None:
    repo = repository(tmp_path, template, 3)
    write_models_config(repo, config([1, 2, 3], {"stable": 1, "canary": 2}))
    registry = Registry(settings(repo, tmp_path).model_copy(update={"canary_percent": 20.0}))

    async def scenario() -> None:
        await registry.start()
        n = 4000
        picks = [registry.resolve("m", split=True, client_key=f"k{i}").version for i in range(n)]
        low, high = bounds(n, 0.2)
        assert set(picks) == {1, 2}  # never 3, the newest: it carries no label
        assert low < picks.count(2) / n < high
        # Metadata reads and labelled requests are not split.
        assert {registry.resolve("m").version for _ in range(200)} == {1}
        assert registry.resolve("m", label="canary", split=True).version == 2
        assert registry.resolve("m", version=3, split=True).version == 3

    run_with(registry, scenario)


def test_without_a_split_unlabelled_requests_stay_on_stable(template: Path, tmp_path: Path) -> None:
    """Loading a canary beside stable moves no traffic (deployment.md's steps 1-2): the
    newest version is the default only when no stable label is served."""
    repo = repository(tmp_path, template, 3)
    write_models_config(repo, config([1, 2, 3], {"stable": 1, "canary": 2}))
    registry = Registry(settings(repo, tmp_path))  # canary_percent 0: no split

    async def scenario() -> None:
        await registry.start()
        picks = {registry.resolve("m", split=True, client_key=f"k{i}").version for i in range(200)}
        assert picks == {1}
        write_models_config(repo, config([1, 2, 3], {"canary": 2}))
        await registry.poll_once()
        assert registry.resolve("m", split=True).version == 3  # TF Serving's rule

    run_with(registry, scenario)


class GatedFactory:
    """create_runtime that holds the load of one version until released."""

    def __init__(self, gated: str) -> None:
        self.gated = gated
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, name: str, version_dir: Path, **kwargs: Any) -> Runtime:
        if version_dir.name == self.gated:
            self.started.set()
            assert self.release.wait(60)
        return create_runtime(name, version_dir, **kwargs)


@pytest.mark.slow
def test_a_label_moves_only_once_its_version_is_available(template: Path, tmp_path: Path) -> None:
    repo = repository(tmp_path, template, 2)
    write_models_config(repo, config([1], {"stable": 1, "canary": 1}))
    factory = GatedFactory("2")
    registry = Registry(settings(repo, tmp_path), runtime_factory=factory)

    def label_gauge(version: int) -> float | None:
        sample = {"model": "m", "label": "canary", "version": str(version)}
        return metrics.REGISTRY.get_sample_value("cnnserve_version_label", sample)

    async def scenario() -> None:
        await registry.start()
        assert label_gauge(1) == 1
        # One careless edit: serve 2 and point canary at it at once (TF Serving would
        # refuse it). Canary keeps answering from 1 while 2 loads.
        write_models_config(repo, config([1, 2], {"stable": 1, "canary": 2}))
        poll = asyncio.create_task(registry.poll_once())
        await asyncio.to_thread(factory.started.wait, 60)
        assert registry.resolve("m", label="canary").version == 1
        assert registry.labels_of("m") == {"stable": 1, "canary": 1}
        factory.release.set()
        await poll
        assert registry.resolve("m", label="canary").version == 2
        assert (label_gauge(1), label_gauge(2)) == (0, 1)
        # A label on a version the policy does not serve moves at once (and says so).
        write_models_config(repo, config([1, 2], {"stable": 1, "canary": 3}))
        await registry.poll_once()
        assert registry.labels_of("m")["canary"] == 3

    run_with(registry, scenario)
