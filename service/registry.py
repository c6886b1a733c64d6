"""What is loaded in memory: model versions, their states and labels, request routing.

The registry follows TF Serving's model manager. Each poll rescans models.config and the
versions (:mod:`service.sources`: version folders, or what a TF Serving backend reports
AVAILABLE), loads the versions the version policy wants and unloads the ones it no
longer wants, availability first: a new version is loaded and warmed, becomes AVAILABLE
and takes traffic before the version it replaces leaves routing, so a model that was
being served never stops being served. A version that fails to load is reported (END
with an error) and leaves the serving one in place.

Requests read one immutable :class:`~service.routing.RoutingTable`, replaced whole on
every change, so a reader never sees half an update, whatever thread it runs on. All
writes happen on the event loop, one poll at a time; the blocking part of a load runs in
a worker thread (:mod:`service.loading`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from service import metrics
from service.batching import BatchingConfig, DynamicBatcher
from service.config import Settings
from service.config_edit import merge_config, write_atomically
from service.errors import (
    BackendError,
    BackendUnavailable,
    CnnserveError,
    ConfigError,
    InvalidRequest,
    LabelOnUnavailableVersion,
    LoadTimedOut,
    ModelNotReady,
    VersionNotFound,
)
from service.loading import PreparedVersion, RuntimeFactory
from service.periodic import every
from service.repository import (
    ASSETS_EXTRA,
    LABELS_FILE,
    MODELS_CONFIG,
    Fingerprint,
    ModelConfig,
    model_configs,
    models_config,
    read_config_text,
    settle_window,
    tf_serving_objections,
)
from service.routing import (
    LoadedVersion,
    RoutingTable,
    TrafficSplit,
    VersionKey,
    VersionState,
    VersionStatus,
    hold_labels,
    listing,
)
from service.runtimes import create_runtime
from service.runtimes.base import Runtime
from service.runtimes.tfserving import UNREACHABLE
from service.sources import Scan, VersionSource, create_source

log = logging.getLogger(__name__)
T = TypeVar("T")
# A held version's rescan comes this long after its wait ends (mtimes are coarse on some
# file systems).
RESCAN_MARGIN_SECONDS = 0.2

__all__ = ["LoadedVersion", "Registry", "VersionState", "VersionStatus"]


@dataclass(frozen=True)
class _Retiring:
    """What unloading a version needs. Deliberately not the LoadedVersion itself: holding
    it would keep alive the object whose release tells us no request still uses it."""

    key: VersionKey
    batcher: DynamicBatcher
    runtime: Runtime
    released: asyncio.Event
    precision: str = "float32"


class Registry:
    """Loaded versions, routing and hot reload for one model repository."""

    def __init__(
        self,
        settings: Settings,
        *,
        runtime_factory: RuntimeFactory = create_runtime,
        source: VersionSource | None = None,
        shedding: Callable[[], bool] | None = None,
    ) -> None:
        """``shedding``: whether the worker is refusing requests for load (its batchers
        then keep batches off the event loop: service.batching)."""
        self._settings = settings
        self._shedding = shedding
        self._source = source or create_source(settings, runtime_factory)
        self._table = RoutingTable(split=TrafficSplit(settings.canary_percent / 100))
        # (model, label, version, whether it failed) of labels held back, as logged.
        self._held: set[tuple[str, str, int, bool]] = set()
        self._dangling: set[tuple[str, str, int]] = set()  # labels on no serving version, warned
        self._versionless: set[str] = set()  # models logged as having nothing to serve
        # Per model, the (served, wanted) versions last logged as kept: logged once.
        self._kept: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._gone_logged: set[VersionKey] = set()  # kept without a folder, logged once
        self._config_error = ""  # the models.config problem last logged
        # Versions whose load failed, with the folder's fingerprint then: retried only
        # once the folder changes, not on every poll.
        self._failed: dict[VersionKey, Fingerprint] = {}
        # Versions whose load failed for a cause that may pass by itself (a read that
        # hung or failed with EIO, ESTALE...): when to try again, and the tries so far.
        # Retried only when their folder changed, one stayed END for good after its
        # network file system came back (TF Serving retries loads too).
        self._retry_at: dict[VersionKey, tuple[float, int]] = {}
        # The failure last logged per version: a TF Serving version is retried every poll
        # (no folder to watch), and the same failure was an error line every poll.
        self._failure_logged: dict[VersionKey, str] = {}
        # The folder's fingerprint when each served version was loaded, and the versions
        # whose folder has changed since (warned once; see _say_which_changed_in_place).
        self._loaded_prints: dict[VersionKey, Fingerprint] = {}
        self._changed_in_place: set[VersionKey] = set()
        self._lock = asyncio.Lock()  # one poll (or stop) at a time
        self._poll_task: asyncio.Task[None] | None = None
        self._refresh: asyncio.Future[None] | None = None  # a shared rescan (refreshed)
        self._unloading: set[VersionKey] = set()  # retiring in the background
        self._settling_logged: set[VersionKey] = set()  # held back while copied in, said
        self._reflected: set[VersionKey] = set()  # LOADING because TF Serving says so
        self._has_served: set[str] = set()  # configured models that have had a version
        self._ready_once = False  # every configured model had one at the same time
        self._background: set[asyncio.Future[None]] = set()
        self._started = False  # the first load pass is done
        self._rescan_due: asyncio.TimerHandle | None = None  # for held versions, polling off
        # Models the last scan could not list (TF Serving unreachable): they keep their
        # routes, but the gateway is not ready, so a load balancer stops sending it traffic.
        self._unreachable: frozenset[str] = frozenset()
        self._unreachable_because: CnnserveError | None = None
        self._stopped = False

    # --- lifecycle ------------------------------------------------------------------

    async def start(self, *, config_may_fail: bool = False) -> None:
        """Load everything models.config wants, then poll in the background.

        A models.config that cannot be read is fatal here (raises ConfigError), as it is
        for TF Serving; later polls log it and keep serving. With ``config_may_fail`` (a
        worker replacing one, whose siblings serve) it is not: the worker serves nothing
        until a poll reads it, rather than stop the whole server.
        """
        try:
            scan = await on_daemon_thread(self._source.scan)
        except ConfigError as exc:
            if not config_may_fail:
                raise
            metrics.observe_models_config(False)
            self._config_error = str(exc)
            log.error(
                "ignoring models.config, nothing is served by this worker until it reads "
                "again (the other workers keep serving): %s",
                exc,
            )
        else:
            metrics.observe_models_config(True)
            async with self._lock:
                await self._retire(await self._reconcile(scan), wait_for_requests=True)
            self._started = True
        if self._settings.poll_seconds > 0:
            self._poll_task = asyncio.create_task(self._poll_forever(), name="registry-poll")

    async def stop(self) -> None:
        """Stop polling and unload every version. Requests still queued fail (retryably)."""
        self._stopped = True
        if self._rescan_due is not None:
            self._rescan_due.cancel()
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        await asyncio.gather(*self._background, return_exceptions=True)
        async with self._lock:
            keys = [(m, v) for m, versions in self._table.served.items() for v in versions]
            await self._retire(self._take_out(keys), wait_for_requests=False)
        await asyncio.to_thread(self._source.close)

    async def _poll_forever(self) -> None:
        await every(
            self._settings.poll_seconds,
            lambda: self.poll_once(wait_for_unloads=False),
            "polling the model repository",
        )

    async def poll_once(self, *, wait_for_unloads: bool = True) -> None:
        """Rescan the repository; load newly wanted versions, then unload unwanted ones.

        Returns once both are done (tests call it instead of waiting for the poller);
        ``wait_for_unloads=False`` returns once the routes are new, the versions that left
        them unloading in the background as their last requests finish (the poller: a
        rescan asked for meanwhile, :meth:`refreshed`, must not wait on them).
        """
        try:
            scan = await on_daemon_thread(self._source.scan)
        except (ConfigError, OSError) as exc:
            metrics.observe_models_config(False)
            if str(exc) != self._config_error:  # once per change, not every poll
                self._config_error = str(exc)
                log.error("ignoring models.config change, current models keep serving: %s", exc)
            return
        metrics.observe_models_config(True)
        if self._config_error:
            self._config_error = ""
            log.info("models.config reads again")
        async with self._lock:
            if self._stopped:
                return
            retiring = await self._reconcile(scan)
            self._started = True  # (after a start that could not read models.config)
            if wait_for_unloads:
                await self._retire(retiring, wait_for_requests=True)
                return
            # Not reloaded while their unload runs (the next poll after it does).
            self._unloading |= {r.key for r in retiring}
        task = asyncio.ensure_future(self._retire(retiring, wait_for_requests=True))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda _: self._unloading.difference_update(r.key for r in retiring))

    async def refreshed(self) -> None:
        """A rescan now, shared by every caller that asks while one runs: requests that
        found their version gone at the backend wait on one, not one each, and only until
        the routes are new (not for the version they hold to unload)."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self.poll_once(wait_for_unloads=False))
        await asyncio.shield(self._refresh)

    async def reload_config(self, text: str) -> None:
        """TF Serving's HandleReloadConfigRequest: apply a whole ModelServerConfig.

        As TF Serving does, a label that is new or moved must point at a version that is
        AVAILABLE already (add the version first, then label it). The config is written
        to models.config (only the entries that change when the models are the same, so
        comments stay), atomically, then this process rescans; other worker processes
        follow on their next poll.
        """
        repository = self._settings.model_repository
        where = str(repository / MODELS_CONFIG)
        try:
            config = models_config(text, where)
            configs = model_configs(repository, config)
        except ConfigError as exc:
            raise InvalidRequest(exc.message.replace(where, "config")) from None
        # Refused as TF Serving refuses it: a file on disk is only warned of (served), but
        # a call that TF Serving answers INVALID_ARGUMENT must not succeed here.
        objections = tf_serving_objections(config)
        if objections:
            raise InvalidRequest(f"config refused: {'; '.join(objections)}")
        # In a function of its own: a frame that holds the routing table (this one waits
        # on the rescan below) would keep each version it unloads in use, and the unload
        # would wait for it until the request timeout.
        self._refuse_labels_on_unserved(configs)
        path = repository / MODELS_CONFIG

        def write() -> None:
            # What is on disk may be unreadable (not UTF-8): a ConfigError, not a 500.
            current = read_config_text(path) if path.exists() else ""
            write_atomically(path, merge_config(current, text, repository))

        async with self._lock:
            await asyncio.to_thread(write)
        await self.poll_once()

    def _refuse_labels_on_unserved(self, configs: list[ModelConfig]) -> None:
        table = self._table
        for config in configs:
            served = table.served.get(config.name, {})
            before = table.configs.get(config.name)
            for label, version in sorted(config.labels.items()):
                moved = before is None or before.labels.get(label) != version
                if moved and version not in served:
                    raise LabelOnUnavailableVersion(
                        f"request to assign label {label!r} to version {version} of model "
                        f"{config.name!r}, which is not currently available for inference; "
                        "add the version to the version policy first, wait until it is "
                        "AVAILABLE, then label it"
                    )

    # --- routing: one table read per call ---------------------------------------------

    @property
    def default_model(self) -> str | None:
        """The first model of models.config; None before it was read."""
        return self._table.default_model

    def model_names(self) -> list[str]:
        return list(self._table.configs)

    def served_versions(self) -> set[str]:
        """The versions serving of the configured models, as ``model/version``."""
        table = self._table
        return {
            f"{name}/{version}" for name in table.configs for version in table.served.get(name, ())
        }

    def is_ready(self) -> bool:
        """The first load pass is done, the source could list every model on its last
        scan, and every configured model has an AVAILABLE (hence warmed) version; once
        that was true, a model added later that is still loading or fails to load no
        longer counts: the replica keeps serving the others (in a Deployment, one bad
        models.config entry took every pod out of the Service), while every model it has
        served must still have a version."""
        if not self._started or self._stopped or self._unreachable:
            return False
        table = self._table
        if table.all_available():
            return True
        served = {m for m in table.configs if table.served.get(m)}
        return (
            self._ready_once and bool(served) and self._has_served & table.configs.keys() <= served
        )

    def labels_of(self, model: str) -> dict[str, int]:
        """Version labels of ``model`` as models.config sets them."""
        return dict(self._table.config(model).labels)

    def resolve(
        self,
        model: str | None,
        version: int | None = None,
        label: str | None = None,
        *,
        split: bool = False,
        client_key: str | None = None,
    ) -> LoadedVersion:
        """See :meth:`RoutingTable.resolve`. A model with nothing to serve because its
        source (TF Serving) cannot be reached says so, rather than "still loading"."""
        try:
            return self._table.resolve(model, version, label, split=split, client_key=client_key)
        except (ModelNotReady, VersionNotFound) as exc:
            name = model if model is not None else self.default_model
            if name in self._unreachable and not self._table.served.get(name):
                raise self._source_problem(exc.message) from None
            raise

    def statuses(self, model: str, version: int | None = None) -> list[VersionStatus]:
        """See :meth:`RoutingTable.statuses`. While the model's source (TF Serving) cannot
        be reached there is no status to give: a gateway polling this one as its TF
        Serving saw versions AVAILABLE that every Predict failed, and stayed ready."""
        if model in self._unreachable:
            raise self._source_problem()
        return self._table.statuses(model, version)

    def _source_problem(self, detail: str | None = None) -> CnnserveError:
        """What a request meets while its model's source cannot list its versions: a
        TF Serving that failed the poll (INTERNAL, ...) says so, 502, rather than "cannot
        be reached"; one that could not be reached is a 503 to retry."""
        problem = self._unreachable_because
        if isinstance(problem, BackendError):
            return copy.copy(problem)
        return BackendUnavailable(UNREACHABLE, detail=detail)

    # --- loading and unloading (on the event loop, under the lock) --------------------

    def _set_state(
        self, key: VersionKey, state: VersionState, error_code: int = 0, message: str = ""
    ) -> None:
        status = VersionStatus(key[1], state, error_code, message)
        # Metrics follow every version, also those of a model just removed from the config.
        metrics.observe_version_state(key[0], key[1], state.name)
        self._table = self._table.with_state(key, status)

    async def _reconcile(self, scan: Scan) -> list[_Retiring]:
        """Load what ``scan`` wants and route to it; returns the versions that left the
        routes, for the caller to retire."""
        # New config first: new models show as not ready, removed ones stop resolving.
        configured = {c.name for c in scan.configs}
        metrics.observe_configured(self._table.configs, configured)
        self._install(scan)
        self._unreachable, self._unreachable_because = scan.unknown, scan.problem
        self._failed = {k: f for k, f in self._failed.items() if k[0] in configured}
        now = time.monotonic()
        for key, (at, _tries) in list(self._retry_at.items()):
            if key[0] not in configured:
                del self._retry_at[key]
            elif at <= now:  # as if its folder had changed: loaded again below
                self._failed.pop(key, None)
        self._failure_logged = {k: m for k, m in self._failure_logged.items() if k[0] in configured}
        self._say_which_have_nothing_to_serve(scan)
        self._say_which_changed_in_place(scan)
        await asyncio.gather(*(self._load(key, scan) for key in self._to_load(scan)))
        await self._fall_back(scan)
        self._reflect_loading(scan)
        self._install(scan)  # labels whose version just became AVAILABLE move now
        # Models that served since they were configured (readiness keeps to them).
        self._has_served &= configured
        self._has_served |= {m for m in configured if self._table.served.get(m)}
        if not self._unreachable and self._table.all_available():
            self._ready_once = True
        return self._take_out(self._to_unload(scan))

    def _say_which_changed_in_place(self, scan: Scan) -> None:
        """A WARNING, once, for a served version whose folder changed since it was loaded
        (a version folder replaced under the same number). It keeps serving what it
        loaded, as TF Serving does; but a worker that starts afresh (a respawn, a SIGHUP
        restart, another replica) loads the new files, and the replica then answered as
        that version from two models, by connection, without a word (an outside audit,
        12-07)."""
        served = {(m, v) for m, versions in self._table.served.items() for v in versions}
        self._loaded_prints = {k: p for k, p in self._loaded_prints.items() if k in served}
        changed = {
            key
            for key, loaded in self._loaded_prints.items()
            if key in scan.fingerprints and scan.fingerprints[key] != loaded
        }
        for model, version in sorted(changed - self._changed_in_place):
            log.warning(
                "%s version %d: its folder %s changed since it was loaded; this worker "
                "serves what it loaded, but a worker or replica that starts afresh loads "
                "the new files, and answers as version %d from another model: publish a "
                "change as a new version number",
                model,
                version,
                scan.versions[model][version],
                version,
            )
        self._changed_in_place = changed

    def _reflect_loading(self, scan: Scan) -> None:
        """Versions TF Serving is loading show LOADING here too, and a model serving none
        of its versions answers 503 model_not_ready (retry) rather than 404 (a reload of
        TF Serving's config, a model just added): they showed END, or nothing, and
        requests got 404 version_not_found, which clients take as final (an outside
        review). One that leaves TF Serving's list without being loaded here is END."""
        reflected = set()
        for key in scan.loading:
            if key[1] in self._table.served.get(key[0], {}):
                continue
            reflected.add(key)
            status = self._table.states.get(key[0], {}).get(key[1])
            if status is None or status.state != VersionState.LOADING:
                self._set_state(key, VersionState.LOADING)
        for key in self._reflected - reflected:
            status = self._table.states.get(key[0], {}).get(key[1])
            if key[0] in scan.unknown:  # unreachable: as it was, until a poll answers
                reflected.add(key)
            elif status is not None and status.state == VersionState.LOADING:
                self._set_state(key, VersionState.END)
        self._reflected = reflected

    async def _fall_back(self, scan: Scan) -> None:
        """A model under a ``latest`` policy that serves nothing because each version the
        policy wants failed to load gets the newest older version on disk that loads,
        tried one at a time. A running worker keeps the version it served when a newer
        one fails (availability first); a worker that starts afresh has none to keep:
        after a broken publish, a worker uvicorn respawned (or a restarted server)
        served nothing, its requests got 404 and /readyz 503, while its siblings served
        the older version. TF Serving would serve nothing here; the gateway serves what
        a running server would, and says so. It stays until a wanted version loads
        (:meth:`_to_unload` keeps it, as any served version no longer wanted)."""
        for config in scan.configs:
            model = config.name
            if config.policy != "latest" or model in scan.unknown or self._table.served.get(model):
                continue
            wanted = scan.wanted(config)
            if not wanted or any((model, v) not in self._failed for v in wanted):
                continue  # nothing on disk, or a wanted version not tried (or loading)
            older = sorted(set(scan.versions.get(model, {})) - wanted, reverse=True)
            for version in older:
                key = (model, version)
                if self._failed.get(key) == scan.fingerprints[key] or key in self._unloading:
                    continue
                await self._load(key, scan)
                if self._table.served.get(model):
                    log.warning(
                        "model %s: serving version %d, the newest that loads, because "
                        "version(s) %s failed to load (it serves until one of them does)",
                        model,
                        version,
                        listing(sorted(wanted)),
                    )
                    break

    def _say_which_have_nothing_to_serve(self, scan: Scan) -> None:
        """A configured model with no version its policy serves keeps the server unready;
        say why, once per model until that changes (TF Serving logs "No versions of
        servable … found")."""
        versionless = set()
        for config in scan.configs:
            if config.name in scan.unknown or scan.wanted(config):
                continue
            versionless.add(config.name)
            if config.name in self._versionless:  # said already
                continue
            if not self._source.keeps_unlisted:
                log.warning(
                    "model %s: TF Serving lists no version AVAILABLE for it; its requests "
                    "are refused until it does (and a server starting is not ready)",
                    config.name,
                )
            else:
                found = sorted(scan.versions.get(config.name, {}))
                # The versions it serves are kept (said by _to_unload): only a model
                # serving none has its requests refused.
                refused = (
                    "the version it serves is kept until one is"
                    if self._table.served.get(config.name)
                    else "its requests are refused until it has one (and a server starting "
                    "is not ready)"
                )
                log.warning(
                    "model %s: no version to serve (%s; policy %s); publish a numbered "
                    "version folder under %s, or fix its base_path or version policy: %s",
                    config.name,
                    f"versions on disk: {found}" if found else "no numbered folders found",
                    config.policy,
                    config.base_path,
                    refused,
                )
        self._versionless = versionless

    def _install(self, scan: Scan) -> None:
        """Swap in the new configs, each label moving only once its version serves."""
        previous = self._table.configs
        installed, held = [], set()
        dangling: set[tuple[str, str, int]] = set()
        for config in scan.configs:
            served = self._table.served.get(config.name, {})
            before = previous.get(config.name)
            on_disk = scan.versions.get(config.name, {})
            routed, waiting = hold_labels(config, before, served, on_disk)
            for label, old, new in waiting:
                failed = (config.name, new) in self._failed
                absent = new not in on_disk
                held.add((config.name, label, new, failed))
                if (config.name, label, new, failed) in self._held:  # once, not every poll
                    continue
                if failed:
                    # Not retried until its folder changes: the label stays for good.
                    log.warning(
                        "model %s: label %r stays on version %d: version %d failed to "
                        "load (its status says why); fix or replace that version folder, "
                        "or point the label back",
                        config.name,
                        label,
                        old,
                        new,
                    )
                else:
                    log.info(
                        "model %s: label %r stays on version %d until version %d is available%s",
                        config.name,
                        label,
                        old,
                        new,
                        f" (no folder {config.base_path / str(new)} yet)" if absent else "",
                    )
            dangling |= self._warn_dangling(routed, served, on_disk, {w[0] for w in waiting})
            installed.append(routed)
            metrics.observe_labels(config.name, before.labels if before else {}, routed.labels)
        self._held = held
        self._dangling = dangling
        self._table = self._table.with_configs(installed)

    def _warn_dangling(
        self,
        config: ModelConfig,
        served: Mapping[int, LoadedVersion],
        on_disk: Mapping[int, Path],
        held: set[str],
    ) -> set[tuple[str, str, int]]:
        """Labels that point at a version that will not serve: no folder, a policy that
        does not serve it, or a failed load (a version loading is no news). Their
        requests get 404; said once as a warning (it was said nowhere, and
        cnnserve_version_label showed the label as set)."""
        dangling = set()
        for label, version in sorted(config.labels.items()):
            if version in served or label in held:
                continue
            if version not in on_disk:
                why = f"has no folder {config.base_path / str(version)}"
            elif not config.would_serve(version, set(on_disk)):
                why = "is not served by the version policy"
            elif (config.name, version) in self._failed:
                why = "failed to load (its status says why)"
            else:
                continue  # loading
            key = (config.name, label, version)
            dangling.add(key)
            if key not in self._dangling:
                log.warning(
                    "model %s: label %r points at version %d, which %s: requests for the "
                    "label get 404 until it serves",
                    config.name,
                    label,
                    version,
                    why,
                )
        return dangling

    def _to_load(self, scan: Scan) -> list[VersionKey]:
        keys = []
        settling = set()
        for config in scan.configs:
            if config.name in scan.unknown:
                continue
            served = self._table.served.get(config.name, {})
            for version in sorted(scan.wanted(config)):
                key = (config.name, version)
                if (
                    version not in served
                    and key not in self._unloading
                    and self._failed.get(key) != scan.fingerprints[key]
                ):
                    if self._settling(key, scan.versions[config.name][version]):
                        settling.add(key)
                    else:
                        keys.append(key)
        self._settling_logged &= settling
        return keys

    def _settling(self, key: VersionKey, path: Path) -> bool:
        """Whether the version's folder may still be being copied in (changed moments
        ago: service.repository.unsettled); said once a version."""
        # Not at start-up: what is there then is loaded as it is (a server started right
        # after a publish, a worker replacing one beside siblings that serve it).
        age = self._source.unsettled(path, quiet=self._started)
        if age is None:
            return False
        labelled = os.path.lexists(path / ASSETS_EXTRA / LABELS_FILE)  # as unsettled reads it
        self._rescan_later(settle_window(labelled) - max(age, 0.0))
        if key not in self._settling_logged:
            self._settling_logged.add(key)
            log.info(
                "%s version %d: %s changed %.1f s ago%s; loading it once it is unchanged "
                "for %g s (a copy in progress? publish a version whole: copy it under a "
                "temporary name, then rename it)",
                *key,
                path,
                max(age, 0.0),
                "" if labelled else f" and has no {ASSETS_EXTRA}/{LABELS_FILE} yet",
                settle_window(labelled),
            )
        return True

    def _rescan_later(self, left: float) -> None:
        """A rescan once a held version's wait is over (``left`` seconds from now), when
        no poll would come by then to load it (polling off: a version a reload RPC found
        moments after its copy was held for good). Again while one is still held after
        it (a scan that failed: a network file system's hiccup)."""
        wait = max(left, 0.0) + RESCAN_MARGIN_SECONDS
        if 0 < self._settings.poll_seconds <= wait or self._rescan_due is not None:
            return

        def rescan() -> None:
            self._rescan_due = None
            if self._stopped:
                return
            task = asyncio.ensure_future(self.poll_once(wait_for_unloads=False))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            task.add_done_callback(rescanned)

        def rescanned(task: asyncio.Future[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("rescanning the model repository failed: %s", task.exception())
            if self._settling_logged and not self._stopped:
                self._rescan_later(left)

        self._rescan_due = asyncio.get_running_loop().call_later(wait, rescan)

    def _to_unload(self, scan: Scan) -> list[VersionKey]:
        configs = {c.name: c for c in scan.configs}
        keys = []
        kept = {}
        for model, served in self._table.served.items():
            if model not in configs:
                keys += [(model, v) for v in served]
                continue
            if model in scan.unknown:  # unreachable source: keep serving what we serve
                continue
            if not self._source.keeps_unlisted:
                # TF Serving stopped listing it AVAILABLE (unloaded, LOADING again, END):
                # it cannot be served, so it goes now; routes and readiness follow.
                listed = scan.versions.get(model, {})
                gone = [v for v in served if v not in listed]
                keys += [(model, v) for v in gone]
                served = {v: loaded for v, loaded in served.items() if v in listed}
            wanted = scan.wanted(configs[model]) | self._named_but_gone(
                configs[model], served.keys(), scan
            )
            held = self._held_by_labels(model, configs[model])
            # Availability first: unwanted versions go only once a wanted one serves (one
            # a label is held on is no wanted one: it would have let the others go).
            if wanted & served.keys():
                keys += [(model, v) for v in served if v not in wanted | held]
            elif any(v not in wanted for v in served):
                now = kept[model] = (tuple(sorted(served)), tuple(sorted(wanted)))
                if self._kept.get(model) != now:  # log once, not every poll
                    log.warning(
                        "model %s: keeping version(s) %s until a wanted version (%s) is available",
                        model,
                        listing(now[0]),
                        listing(now[1]),
                    )
        self._kept = kept
        return keys

    def _held_by_labels(self, model: str, config: ModelConfig) -> set[int]:
        """The versions labels stay on until the version they were moved to serves
        (routing.hold_labels): kept, though the policy no longer lists them. A one-step
        edit that moves a label and drops its old version from the policy (policy {8, 11}
        canary 11, from {5, 8} canary 5) unloaded version 5 at once, and the label's
        requests got 404 until 11 served, for good when 11 failed to load; the default
        route, with `stable` so held, went to the newest version (an outside audit,
        12-07)."""
        routed = self._table.configs.get(model)
        if routed is None:
            return set()
        return {v for label, v in routed.labels.items() if config.labels.get(label) != v}

    def _named_but_gone(self, config: ModelConfig, served: Iterable[int], scan: Scan) -> set[int]:
        """Served versions that a specific policy names but whose folder went: kept (the
        policy still asks for them, and labels may route to them; unloaded, their
        requests got 404 until the folder came back). Under latest or all, deleting a
        folder is how TF Serving rolls back or retires a version, and it still does."""
        if config.policy != "specific":
            return set()
        on_disk = scan.versions.get(config.name, {})
        gone = {v for v in served if v in config.versions and v not in on_disk}
        for version in gone - {v for m, v in self._gone_logged if m == config.name}:
            log.warning(
                "model %s: the folder of version %d is gone; it stays loaded while "
                "models.config names it (take it out of the policy to unload it)",
                config.name,
                version,
            )
        self._gone_logged = {k for k in self._gone_logged if k[0] != config.name} | {
            (config.name, v) for v in gone
        }
        return gone

    async def _load(self, key: VersionKey, scan: Scan) -> None:
        model, version = key
        path = scan.versions[model][version]
        self._set_state(key, VersionState.START)
        self._set_state(key, VersionState.LOADING)
        retried = key in self._failure_logged and self._source.retries_every_scan
        log.log(
            logging.DEBUG if retried else logging.INFO,
            "loading %s version %d from %s",
            model,
            version,
            path,
        )
        try:
            prepared = await self._prepare(key, path)
            loaded = await self._serve(key, path, prepared)
        except Exception as exc:
            self._failed[key] = scan.fingerprints[key]
            code, message = _describe_failure(exc)
            if _transient(exc):
                tries = self._retry_at.get(key, (0.0, 0))[1] + 1
                delay = min(RETRY_LOAD_MAX_SECONDS, RETRY_LOAD_SECONDS * 2 ** (tries - 1))
                self._retry_at[key] = (time.monotonic() + delay, tries)
                message += f" (tried again in {delay:g} s, or once its folder changes)"
            else:
                self._retry_at.pop(key, None)
            if retried and self._failure_logged.get(key) == message:
                log.debug("%s version %d still fails to load: %s", model, version, message)
            else:
                # Expected failures are one line (a file the server may not read among
                # them: an operator's to fix, not a bug); anything else its traceback.
                log.error(
                    "%s version %d failed to load: %s",
                    model,
                    version,
                    # With what the status leaves out: a TF Serving backend's address.
                    exc.log_message() if isinstance(exc, CnnserveError) else message,
                    exc_info=not isinstance(exc, CnnserveError | OSError),
                )
                self._failure_logged[key] = message
            self._set_state(key, VersionState.END, code, message)
            metrics.observe_model_event(model, "load_failed")
            return
        metrics.observe_load(model, prepared.load_seconds, prepared.warmup_seconds)
        metrics.observe_model_event(model, "loaded")
        precision = _precision(loaded.runtime)
        metrics.observe_runtime(model, version, loaded.runtime.name, precision, loaded=True)
        self._failed.pop(key, None)
        self._retry_at.pop(key, None)
        self._failure_logged.pop(key, None)
        # A TF Serving source's "fingerprint" is its scan count (it has no folder to
        # watch: retries_every_scan): no file changed when it moves on.
        if key in scan.fingerprints and not self._source.retries_every_scan:
            self._loaded_prints[key] = scan.fingerprints[key]
        self._changed_in_place.discard(key)
        self._table = self._table.with_served(loaded)  # from here on it takes requests
        self._set_state(key, VersionState.AVAILABLE)
        log.info(
            "%s version %d is available (%s runtime, %s)",
            model,
            version,
            loaded.runtime.name,
            precision,
        )

    async def _prepare(self, key: VersionKey, path: Path) -> PreparedVersion:
        """Load and warm a version on a thread, within ``load_timeout_seconds``: polls
        wait for each load, so one that hangs (a read of a stuck network file system)
        held up every later version of every model. A thread cannot be stopped: one past
        the timeout is left to finish, and what it loads is unloaded then."""
        work = on_daemon_thread(self._source.prepare, key, path)
        timeout = self._settings.load_timeout_seconds
        try:
            return await asyncio.wait_for(asyncio.shield(work), timeout or None)
        except TimeoutError:
            work.add_done_callback(_unload_late)
            raise LoadTimedOut(
                f"{key[0]} version {key[1]} did not load within {timeout:g} s "
                f"(CNNSERVE_LOAD_TIMEOUT_SECONDS), reading {path}: a file read that hangs "
                "(a stuck network file system?)"
            ) from None

    async def _serve(self, key: VersionKey, path: Path, prepared: PreparedVersion) -> LoadedVersion:
        """Start the batcher of a loaded, warmed runtime."""
        model, version = key
        config = BatchingConfig.from_settings(self._settings)
        metrics.announce_version(model, version, prepared.labels)
        observer = metrics.BatcherMetrics(model, version, config.queue_capacity, prepared.labels)
        batcher = DynamicBatcher(
            prepared.runtime.predict_parts,
            config,
            steps=prepared.runtime.predict_steps,
            observer=observer,
            name=f"{model}/{version}",
            inline=prepared.runtime.computes_on_caller,
            shedding=self._shedding,
        )
        try:
            await batcher.start()
        except BaseException:
            await asyncio.to_thread(prepared.runtime.unload)
            raise
        return LoadedVersion(
            model=model,
            version=version,
            path=path,
            labels=prepared.labels,
            spec=prepared.spec,
            card=prepared.card,
            runtime=prepared.runtime,
            batcher=batcher,
        )

    def _take_out(self, keys: list[VersionKey]) -> list[_Retiring]:
        """Remove versions from routing, returning what unloading them needs.

        Each version gets a finalizer that fires once nothing holds it any more: requests
        that resolved it just before it left routing may still be decoding their images
        and reach its batcher only afterwards. This frame's references end on return.
        """
        loop = asyncio.get_running_loop()
        retiring = []
        for model, version in keys:
            loaded = self._table.served[model][version]
            released = asyncio.Event()
            finalizer = weakref.finalize(loaded, _set_from_any_thread, loop, released)
            finalizer.atexit = False
            retiring.append(
                _Retiring(
                    (model, version),
                    loaded.batcher,
                    loaded.runtime,
                    released,
                    _precision(loaded.runtime),
                )
            )
        self._table = self._table.without(keys)
        for key in keys:
            self._set_state(key, VersionState.UNLOADING)
        return retiring

    async def _retire(self, retiring: list[_Retiring], *, wait_for_requests: bool) -> None:
        await asyncio.gather(*(self._unload(r, wait_for_requests) for r in retiring))

    async def _unload(self, retiring: _Retiring, wait_for_requests: bool) -> None:
        model, version = retiring.key
        if wait_for_requests:
            # Bounded by the default request deadline: a request still holding the
            # version after that is past its deadline or was given an unusually long one.
            limit = self._settings.request_timeout_seconds
            try:
                await asyncio.wait_for(retiring.released.wait(), limit)
            except TimeoutError:
                log.warning(
                    "%s version %d still in use %.1fs after leaving routing; unloading it",
                    model,
                    version,
                    limit,
                )
        try:
            await retiring.batcher.stop()
            await asyncio.to_thread(retiring.runtime.unload)
        except Exception:
            log.exception("unloading %s version %d failed", model, version)
        self._set_state(retiring.key, VersionState.END)
        metrics.observe_runtime(
            model, version, retiring.runtime.name, retiring.precision, loaded=False
        )
        metrics.observe_model_event(model, "unloaded")
        log.info("%s version %d unloaded", model, version)


def _precision(runtime: Runtime) -> str:
    """The precision of the artifact a loaded runtime answers from (float32 unless the
    runtime says otherwise, as LiteRT does for a quantized artifact)."""
    return str(runtime.info.extra.get("precision", "float32"))


def _set_from_any_thread(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
    """Finalizer callback: the last reference may be dropped on any thread."""
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
        loop.call_soon_threadsafe(event.set)


def on_daemon_thread(func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``func(*args)`` on a daemon thread of its own, for what reads the repository: a
    read that hangs (a stuck network file system) must not hold the process at exit.
    On the loop's default executor, SIGTERM logged "Finished server process" and the
    worker lived on (15 min, until the read returned): asyncio.run waits for that
    executor's threads, and the interpreter for every thread not a daemon."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled: nobody waits
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            outcome: tuple[T | None, BaseException | None] = (func(*args), None)
        except BaseException as exc:  # handed to the waiter, as an executor would
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name=f"repository-{func.__name__}", daemon=True).start()
    return future


def _unload_late(work: asyncio.Future[PreparedVersion]) -> None:
    """A load that finished after its timeout: nothing serves it, so its memory goes."""
    if not work.cancelled() and work.exception() is None:
        threading.Thread(target=work.result().runtime.unload, daemon=True).start()


# A load that failed for a cause that may pass (service.registry._transient) is tried
# again after this long, doubled each time, up to the most.
RETRY_LOAD_SECONDS = 30.0
RETRY_LOAD_MAX_SECONDS = 600.0
# OSErrors of a file system that may come back by itself, not of a file to mend.
_TRANSIENT_ERRNOS = frozenset(
    {errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.EAGAIN, errno.EBUSY, errno.ENOLCK,
     errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNRESET,
     errno.ECONNREFUSED, errno.ENOMEM}
)  # fmt: skip


def _transient(exc: BaseException) -> bool:
    """Whether a load failure may pass by itself (retried later, not only once the
    folder changes)."""
    if isinstance(exc, LoadTimedOut):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def _describe_failure(exc: BaseException) -> tuple[int, str]:
    """gRPC code number and a one-line message for a failed load (no traceback)."""
    if isinstance(exc, OSError):
        # A file of the version the server cannot read (permissions, a folder where a
        # file belongs, I/O errors): the version is damaged as any other (INTERNAL, as
        # ModelLoadError), not an unknown failure.
        where = f" {exc.filename}" if exc.filename else ""
        return int(grpc.StatusCode.INTERNAL.value[0]), f"cannot read{where}: {exc.strerror or exc}"
    code = exc.grpc_code if isinstance(exc, CnnserveError) else grpc.StatusCode.UNKNOWN
    text = exc.message if isinstance(exc, CnnserveError) else f"{type(exc).__name__}: {exc}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return int(code.value[0]), first[:500]
