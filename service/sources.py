"""Where the registry's versions come from: the disk (embedded) or a TF Serving (tfserving).

The registry only needs two blocking calls from a source: ``scan`` (models.config and the
versions each model has) and ``prepare`` (one version as a loaded, warmed runtime). The
disk source reads version folders and loads them in-process; the TF Serving source
lists what TF Serving reports AVAILABLE and "loads" a version by asking TF Serving for
its signature (:mod:`service.runtimes.tfserving`). Everything else (version policy, labels,
availability-first reload, routing) is the registry's, the same for both.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from service import metrics
from service.config import Settings
from service.errors import BackendUnavailable, CnnserveError, DeadlineExceeded, Overloaded
from service.loading import PreparedVersion, RuntimeFactory, prepare_runtime, prepare_version
from service.repository import (
    Fingerprint,
    ModelConfig,
    ModelsConfigReader,
    unsettled,
    version_dirs,
    version_fingerprint,
)
from service.routing import VersionKey, listing
from service.runtimes.tfserving import TFServingClient, TFServingRuntime

log = logging.getLogger(__name__)

# A TF Serving too busy to answer a poll is said so in the log at most this often: under
# load its polls can be refused every other time.
BUSY_LOG_SECONDS = 60.0


@dataclass(frozen=True)
class Scan:
    """One look at the source: the config and each configured model's versions."""

    configs: list[ModelConfig]
    versions: dict[str, dict[int, Path]]  # model → version → its folder on this disk
    # A failed load is retried once its fingerprint changes.
    fingerprints: dict[VersionKey, Fingerprint]
    # Models whose versions could not be listed this time: leave them as they are.
    unknown: frozenset[str] = field(default_factory=frozenset)
    # Why they could not be: what their requests are told.
    problem: CnnserveError | None = None
    # Versions loading elsewhere (TF Serving lists them START or LOADING), not wanted
    # from this source yet: a model serving none is not ready, not missing.
    loading: frozenset[VersionKey] = field(default_factory=frozenset)

    def wanted(self, config: ModelConfig) -> set[int]:
        return config.wanted_versions(self.versions.get(config.name, {}))


@dataclass(frozen=True)
class _Listing:
    """One model folder as a scan listed it."""

    base_path: Path
    versions: dict[int, Path]
    fingerprints: dict[int, Fingerprint]


class VersionSource(Protocol):
    # Whether a loaded version can go on serving once a scan no longer lists it: one in
    # this process's memory can (its folder deleted, kept until a replacement serves);
    # one TF Serving stopped listing AVAILABLE cannot (its Predicts fail).
    keeps_unlisted: bool
    # Whether a failed load is retried on every scan (no folder to watch for a change),
    # so the same failure again is not news; a folder's is retried once it changed.
    retries_every_scan: bool

    def scan(self) -> Scan:
        """Read models.config and list versions; blocking. A models.config that cannot be
        read raises ConfigError (or OSError)."""

    def prepare(self, key: VersionKey, path: Path) -> PreparedVersion:
        """One version, loaded and warmed; blocking (seconds). Raises on failure."""

    def unsettled(self, path: Path, *, quiet: bool = True) -> float | None:
        """Seconds since the version's folder last changed while it may still be being
        copied in (not loaded yet then), else None; ``quiet``: as
        service.repository.unsettled."""

    def close(self) -> None:
        """Release connections; the registry calls it once, when it stops."""


class DiskSource:
    """Version folders of the model repository, loaded by an in-process runtime."""

    keeps_unlisted = True
    retries_every_scan = False

    def __init__(self, settings: Settings, runtime_factory: RuntimeFactory) -> None:
        self._settings = settings
        self._runtime_factory = runtime_factory
        self._config = ModelsConfigReader()
        # Each model's last listing: its base path, versions and their fingerprints.
        self._seen: dict[str, _Listing] = {}
        self._unlisted: dict[str, str] = {}  # model → the listing problem last logged
        # The backend is this process: up while it answers, so an alert on
        # cnnserve_backend_up == 0 needs no exception for embedded gateways.
        metrics.observe_backend(True)

    def scan(self) -> Scan:
        configs = self._config.read(self._settings.model_repository)
        seen = {config.name: self._list(config) for config in configs}
        self._seen = seen
        self._unlisted = {m: p for m, p in self._unlisted.items() if m in seen}
        return Scan(
            configs,
            {name: folder.versions for name, folder in seen.items()},
            {
                (name, v): fingerprint
                for name, folder in seen.items()
                for v, fingerprint in folder.fingerprints.items()
            },
        )

    def _list(self, config: ModelConfig) -> _Listing:
        """The versions of one model's folder. One that cannot be listed (permissions,
        an I/O error) keeps the versions it had when last listed, unchanged: it neither
        stops the other models' reloads nor counts as a models.config problem, nor does
        it unload or retry its own versions (a warning, once per change, says so)."""
        try:
            found = version_dirs(config.base_path)
        except OSError as exc:
            last = self._seen.get(config.name)
            kept = last if last is not None and last.base_path == config.base_path else None
            problem = str(exc)
            if self._unlisted.get(config.name) != problem:
                self._unlisted[config.name] = problem
                log.warning(
                    "model %s: cannot list the versions in %s (%s); %s until it can be",
                    config.name,
                    config.base_path,
                    problem,
                    f"its versions as last seen ({listing(sorted(kept.versions))}) are kept"
                    if kept is not None and kept.versions
                    else "it has no known version",
                )
            return kept if kept is not None else _Listing(config.base_path, {}, {})
        if self._unlisted.pop(config.name, None) is not None:
            log.info(
                "model %s: the versions in %s can be listed again", config.name, config.base_path
            )
        prints = {v: version_fingerprint(path) for v, path in found.items()}
        return _Listing(config.base_path, found, prints)

    def unsettled(self, path: Path, *, quiet: bool = True) -> float | None:
        return unsettled(path, quiet=quiet)

    def prepare(self, key: VersionKey, path: Path) -> PreparedVersion:
        return prepare_version(
            path,
            runtime_factory=self._runtime_factory,
            runtime_name=self._settings.runtime,
            cache_dir=self._settings.cache_dir,
            threads=self._settings.inference_threads,
        )

    def close(self) -> None:
        pass


class TFServingSource:
    """Versions TF Serving reports AVAILABLE for the models of the local models.config.

    The gateway reads models.config to know the model names (TF Serving has no call that
    lists them); TF Serving applies the same config, so the version policies agree.

    A poll TF Serving refused for load (RESOURCE_EXHAUSTED), or one that timed out right
    after a poll it answered, finds it busy, not gone: the model keeps the versions it
    listed last, and readiness and ``cnnserve_backend_up`` stay as they were (a peer
    under load made the gateway's readiness flap). Two timed-out polls in a row, or any
    other failure, and the model's versions are unknown: TF Serving is unreachable.
    """

    keeps_unlisted = False
    retries_every_scan = True

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._config = ModelsConfigReader()
        self.client = TFServingClient(
            settings.tfserving_address,
            settings.request_timeout_seconds,
            settings.tfserving_ca_file,
        )
        self._scans = 0
        # TF Serving answered every poll of the last scan (a refusal for load is an answer).
        self._answered = False
        self._listed: dict[str, list[int]] = {}  # model → the versions it listed last
        self._busy_logged = -BUSY_LOG_SECONDS  # monotonic time of the last "busy" line
        self._failing: str | None = None  # the poll failure last logged (not unreachable)
        if settings.poll_seconds <= 0:
            log.warning(
                "poll_seconds is 0: TF Serving's versions are read once, at start; a TF "
                "Serving that is not up by then is never used"
            )

    def scan(self) -> Scan:
        configs = self._config.read(self._settings.model_repository)
        self._scans += 1
        versions: dict[str, dict[int, Path]] = {}
        unknown: set[str] = set()
        listed: dict[str, list[int]] = {}
        loading: set[VersionKey] = set()
        problem: CnnserveError | None = None
        answered = True
        for config in configs:
            try:
                found, coming = self.client.versions(config.name)
            except CnnserveError as exc:
                answered = answered and isinstance(exc, Overloaded)
                last = self._listed.get(config.name)
                if last is None or not self._busy(exc):
                    unknown.add(config.name)
                    problem = exc
                    continue
                found, coming = last, []
            loading |= {(config.name, v) for v in coming if v not in found}
            listed[config.name] = found
            versions[config.name] = {v: config.base_path / str(v) for v in found}
        self._listed, self._answered = listed, answered
        self._note(problem)
        # A remote load that failed is retried on the next scan: the usual cause, TF
        # Serving restarting, is gone by then, and there is no folder whose change to wait for.
        fingerprints: dict[VersionKey, Fingerprint] = {
            (m, v): (self._scans,) for m, found in versions.items() for v in found
        }
        return Scan(
            configs, versions, fingerprints, frozenset(unknown), problem, frozenset(loading)
        )

    def _busy(self, error: CnnserveError) -> bool:
        """Whether a poll's failure means TF Serving is loaded rather than gone (see the
        class's doc); says so in the log once in a while (BUSY_LOG_SECONDS)."""
        loaded = isinstance(error, Overloaded)
        if not (loaded or (isinstance(error, DeadlineExceeded) and self._answered)):
            return False
        now = time.monotonic()
        if now - self._busy_logged >= BUSY_LOG_SECONDS:
            self._busy_logged = now
            log.info(
                "TF Serving is busy; its models keep the versions it listed last, and "
                "readiness stays (%s)",
                error.detail or error.message,
            )
        return True

    def _note(self, problem: CnnserveError | None) -> None:
        """Log a change of reachability once, not on every poll (nor every request:
        their 503s are counted, not logged). A poll TF Serving answered with a failure
        (INTERNAL, UNAUTHENTICATED, UNIMPLEMENTED, ...) is no better for the gateway: its
        model is refused and readiness 503 as well, so ``cnnserve_backend_up`` is 0 and
        one warning names the failure too (they were silent: an outside review found a
        gateway unready for good, its alert never firing, its log empty)."""
        down = _unreachable(problem)
        metrics.observe_backend(problem is None)
        reachable = self.client.down is None
        if down is not None and reachable:
            log.warning("%s; current versions keep their routes meanwhile", down.log_message())
        elif down is None and not reachable:
            log.info("TF Serving at %s answers again", self.client.address)
        # Answered with a failure (not unreachable): said once, until it changes.
        said = problem.log_message() if problem is not None and down is None else None
        if said is not None and said != self._failing:
            log.warning(
                "%s; its models are refused, and readiness 503, until a poll succeeds", said
            )
        elif said is None and self._failing is not None and down is None:
            log.info("TF Serving at %s answers its status polls again", self.client.address)
        self._failing = said
        # Predicts fail at once meanwhile (TFServingClient.call), not after their deadline.
        self.client.down = down

    def unsettled(self, path: Path, *, quiet: bool = True) -> float | None:
        return None  # TF Serving loaded it: what it lists AVAILABLE is there

    def prepare(self, key: VersionKey, path: Path) -> PreparedVersion:
        model, version = key
        return prepare_runtime(TFServingRuntime(self.client, model, version, path), path)

    def close(self) -> None:
        self.client.close()


def _unreachable(problem: CnnserveError | None) -> BackendUnavailable | None:
    """What Predicts fail with while the polls find TF Serving down: unreachable, or
    silent past the poll's deadline, said as the 503 it is to a client. A timed-out
    poll was handed on as it was, so every Predict got 504 "did not answer
    GetModelStatus in time" (no Retry-After, counted as the request's own deadline)
    while the status routes said 503. Any other failure (a model TF Serving does not
    know) is an answer: Predicts to the models it serves go on."""
    if isinstance(problem, BackendUnavailable):
        return problem.with_traceback(None)
    if isinstance(problem, DeadlineExceeded):
        return BackendUnavailable(
            "the model backend (TF Serving) does not answer; retry shortly",
            detail=problem.detail or problem.message,
        )
    return None


def create_source(settings: Settings, runtime_factory: RuntimeFactory) -> VersionSource:
    """The source ``settings.backend`` names."""
    if settings.backend == "tfserving":
        return TFServingSource(settings)
    return DiskSource(settings, runtime_factory)
