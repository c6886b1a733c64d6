"""The registry on a source that cannot always list versions (TF Serving unreachable)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from service.registry import Registry, VersionState
from service.runtimes import create_runtime
from service.sources import DiskSource, Scan
from tests.helpers.core import IMAGES, run_with, settings
from tests.helpers.models import publish_tiny, simple_config, write_models_config


class FlakySource(DiskSource):
    """The real disk source, except that while ``reachable`` is False no model's versions
    can be listed: what the TF Serving source reports when TF Serving is down."""

    reachable = True

    def scan(self) -> Scan:
        scan = super().scan()
        if self.reachable:
            return scan
        names = frozenset(c.name for c in scan.configs)
        return dataclasses.replace(scan, versions={}, fingerprints={}, unknown=names)


def flaky_registry(tmp_path: Path) -> tuple[FlakySource, Registry]:
    """A repository with model "m" version 1, and a registry on a FlakySource of it."""
    repo = tmp_path / "repo"
    publish_tiny(repo, "m")
    write_models_config(repo, simple_config("m"))
    config = settings(repo, tmp_path)
    source = FlakySource(config, create_runtime)
    return source, Registry(config, source=source)


def test_unknown_versions_keep_serving_until_listed_again(tmp_path: Path) -> None:
    source, registry = flaky_registry(tmp_path)

    async def scenario() -> None:
        await registry.start()
        assert registry.resolve("m").version == 1
        source.reachable = False
        model_dir = tmp_path / "repo" / "m"
        shutil.copytree(model_dir / "1", model_dir / "2")
        await registry.poll_once()  # nothing listed: nothing loaded, nothing unloaded
        assert registry.resolve("m").version == 1
        assert not registry.is_ready()  # but a load balancer should route elsewhere
        out = await registry.resolve("m").predict(IMAGES, None)
        assert out.shape == (2, 3) and np.isfinite(out).all()
        source.reachable = True
        await registry.poll_once()
        assert registry.is_ready() and registry.resolve("m").version == 2
        assert {s.version: s.state for s in registry.statuses("m")} == {
            1: VersionState.END,
            2: VersionState.AVAILABLE,
        }

    run_with(registry, scenario)


def test_a_source_unreachable_at_start_leaves_the_registry_waiting(tmp_path: Path) -> None:
    source, registry = flaky_registry(tmp_path)
    source.reachable = False

    async def scenario() -> None:
        await registry.start()  # does not raise: the next poll may reach it
        assert not registry.is_ready() and registry.model_names() == ["m"]
        source.reachable = True
        await registry.poll_once()
        assert registry.is_ready()

    run_with(registry, scenario)
