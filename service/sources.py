"""Where the registry's versions come from: the disk (embedded) or a TF Serving (tfserving).

The registry only needs two blocking calls from a source: ``scan`` (models.config and the
versions each model has) and ``prepare`` (one version as a loaded, warmed runtime). The
disk source reads version folders and loads them in-process; the TF Serving source
(:mod:`service.runtimes.tfserving`) lists what TF Serving reports AVAILABLE and "loads" a
version by asking TF Serving for its signature. Everything else (version policy, labels,
availability-first reload, routing) is the registry's, the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from service.config import Settings
from service.loading import PreparedVersion, RuntimeFactory, prepare_version
from service.repository import (
    Fingerprint,
    ModelConfig,
    read_repository,
    version_dirs,
    version_fingerprint,
)
from service.routing import VersionKey


@dataclass(frozen=True)
class Scan:
    """One look at the source: the config and each configured model's versions."""

    configs: list[ModelConfig]
    versions: dict[str, dict[int, Path]]  # model → version → its folder on this disk
    # A failed load is retried once its fingerprint changes.
    fingerprints: dict[VersionKey, Fingerprint]
    # Models whose versions could not be listed this time: leave them as they are.
    unknown: frozenset[str] = field(default_factory=frozenset)

    def wanted(self, config: ModelConfig) -> set[int]:
        return config.wanted_versions(self.versions.get(config.name, {}))


class VersionSource(Protocol):
    def scan(self) -> Scan:
        """Read models.config and list versions; blocking. A models.config that cannot be
        read raises ConfigError (or OSError)."""

    def prepare(self, key: VersionKey, path: Path) -> PreparedVersion:
        """One version, loaded and warmed; blocking (seconds). Raises on failure."""

    def close(self) -> None:
        """Release connections; the registry calls it once, when it stops."""


class DiskSource:
    """Version folders of the model repository, loaded by an in-process runtime."""

    def __init__(self, settings: Settings, runtime_factory: RuntimeFactory, threads: int) -> None:
        self._settings = settings
        self._runtime_factory = runtime_factory
        self._threads = threads

    def scan(self) -> Scan:
        configs = read_repository(self._settings.model_repository)
        versions = {c.name: version_dirs(c.base_path) for c in configs}
        fingerprints = {
            (name, v): version_fingerprint(path)
            for name, found in versions.items()
            for v, path in found.items()
        }
        return Scan(configs, versions, fingerprints)

    def prepare(self, key: VersionKey, path: Path) -> PreparedVersion:
        return prepare_version(
            path,
            runtime_factory=self._runtime_factory,
            runtime_name=self._settings.runtime,
            cache_dir=self._settings.cache_dir,
            threads=self._threads,
        )

    def close(self) -> None:
        pass


def create_source(
    settings: Settings, runtime_factory: RuntimeFactory, threads: int
) -> VersionSource:
    """The source ``settings.backend`` names."""
    if settings.backend == "tfserving":
        from service.runtimes.tfserving import TFServingSource

        return TFServingSource(settings)
    return DiskSource(settings, runtime_factory, threads)
