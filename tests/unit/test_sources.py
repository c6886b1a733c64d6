"""The registry on a source that cannot always list versions (TF Serving unreachable,
a model folder that cannot be listed, a models.config that cannot be read)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from service import metrics, sources
from service.registry import Registry, VersionState
from service.repository import version_dirs
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


def config_ok() -> float | None:
    return metrics.REGISTRY.get_sample_value("cnnserve_models_config_ok")


def test_a_model_folder_that_cannot_be_listed_leaves_the_others_reloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    for model in ("a", "b"):
        publish_tiny(repo, model)
    write_models_config(repo, simple_config("a", "b"))
    registry = Registry(settings(repo, tmp_path))
    unlistable: set[Path] = set()

    def listing(model_dir: Path) -> dict[int, Path]:
        if model_dir in unlistable:  # what iterdir raises for a folder of mode 000
            raise PermissionError(13, "Permission denied", str(model_dir))
        return version_dirs(model_dir)

    monkeypatch.setattr(sources, "version_dirs", listing)

    async def scenario() -> None:
        await registry.start()
        unlistable.add(repo / "b")
        for model in ("a", "b"):
            shutil.copytree(repo / model / "1", repo / model / "2")
        with caplog.at_level(logging.INFO):
            for _ in range(3):
                await registry.poll_once()
            # a reloads; b keeps what it served (neither unloaded nor a new version).
            assert registry.resolve("a").version == 2
            assert registry.resolve("b").version == 1
            assert {s.version: s.state for s in registry.statuses("b")} == {
                1: VersionState.AVAILABLE
            }
            assert registry.is_ready() and config_ok() == 1
            assert "ignoring models.config change" not in caplog.text
            warnings = [r.getMessage() for r in caplog.records if "cannot list" in r.getMessage()]
            assert len(warnings) == 1, caplog.text  # once per change, not every poll
            assert str(repo / "b") in warnings[0] and "Permission denied" in warnings[0]
            assert "as last seen (1) are kept" in warnings[0]
            unlistable.clear()
            await registry.poll_once()
        assert "can be listed again" in caplog.text
        assert registry.resolve("b").version == 2

    run_with(registry, scenario)


def test_a_models_config_that_is_not_utf8_on_reload_keeps_the_models_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, registry = flaky_registry(tmp_path)
    config = tmp_path / "repo" / "models.config"

    async def scenario() -> None:
        await registry.start()
        good = config.read_bytes()
        with caplog.at_level(logging.INFO, logger="service.registry"):
            for spoil in (lambda: config.write_bytes(b"\xff" + good), config.unlink, config.mkdir):
                spoil()
                for _ in range(3):
                    await registry.poll_once()  # raised UnicodeDecodeError before
                assert registry.resolve("m").version == 1 and config_ok() == 0
                if config.is_dir():
                    config.rmdir()
            config.write_bytes(good)
            await registry.poll_once()
        assert config_ok() == 1
        problems = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(problems) == 3, problems  # one line per change, no traceback
        assert "not UTF-8 text" in problems[0] and "does not exist" in problems[1]
        assert "is a folder" in problems[2]
        assert not any(r.exc_info for r in caplog.records)

    run_with(registry, scenario)
