"""The read side of the registry: which loaded version answers a request.

A :class:`RoutingTable` is an immutable snapshot of models.config, the AVAILABLE versions
and every version's state. The registry builds a new table for every change and swaps it
in with one assignment, so a request (on the event loop or any thread) reads one
consistent table and never half an update. Error messages say what can be asked instead.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from service.batching import DynamicBatcher
from service.contract import CANARY_LABEL, STABLE_LABEL
from service.errors import (
    CnnserveError,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    UnknownVersionLabel,
    VersionNotFound,
)
from service.preprocessing import PreprocessSpec
from service.repository import ModelConfig, version_dirs
from service.requestlog import request_draw
from service.runtimes.base import Batch, Probabilities, Runtime

VersionKey = tuple[str, int]  # (model, version)


class VersionState(enum.IntEnum):
    """TF Serving's ManagerState numbers (get_model_status.proto), names as it prints them."""

    UNKNOWN = 0
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass(frozen=True)
class VersionStatus:
    """One row of GetModelStatus: error_code is a gRPC status code number, 0 = OK."""

    version: int
    state: VersionState
    error_code: int = 0
    error_message: str = ""


@dataclass(frozen=True, eq=False)
class LoadedVersion:
    """An AVAILABLE version: what a request needs to be preprocessed, run and labelled."""

    model: str
    version: int
    path: Path
    labels: list[str]
    spec: PreprocessSpec
    card: Mapping[str, Any]
    runtime: Runtime
    batcher: DynamicBatcher

    async def predict(
        self, batch: Batch, deadline: float | None, timings: dict[str, float] | None = None
    ) -> Probabilities:
        """Run ``batch`` through this version's batcher; ``deadline`` is time.monotonic().
        ``timings`` gets ``queue_wait`` and ``inference`` seconds."""
        return await self.batcher.submit(batch, deadline=deadline, timings=timings)


@dataclass(frozen=True)
class TrafficSplit:
    """A share of unlabelled requests for the ``canary`` version, the rest for ``stable``.

    A client key (a header) hashes to a fixed point in [0, 1), so one client keeps
    seeing one version while the share stays put; a request without a key is drawn at
    random, once (its room checks and its inference agree). The hash is keyed by model
    and stable across processes (not ``hash()``).
    """

    canary_share: float = 0.0  # 0..1; 0 = off

    def to_canary(self, model: str, client_key: str | None) -> bool:
        if self.canary_share <= 0:
            return False
        if client_key:
            digest = hashlib.blake2b(f"{model}\0{client_key}".encode(), digest_size=8).digest()
            point = int.from_bytes(digest, "big") / 2**64
        else:
            point = request_draw()
        return point < self.canary_share


@dataclass(frozen=True)
class RoutingTable:
    """One consistent view of what is served. Never mutated: the ``with_*`` methods
    return a new table."""

    configs: Mapping[str, ModelConfig] = field(default_factory=dict)  # models.config order
    served: Mapping[str, Mapping[int, LoadedVersion]] = field(default_factory=dict)
    states: Mapping[str, Mapping[int, VersionStatus]] = field(default_factory=dict)
    split: TrafficSplit = field(default_factory=TrafficSplit)

    # --- reads ----------------------------------------------------------------------

    @property
    def default_model(self) -> str | None:
        return next(iter(self.configs), None)

    def all_available(self) -> bool:
        """Every configured model has an AVAILABLE version."""
        return bool(self.configs) and all(self.served.get(name) for name in self.configs)

    def config(self, model: str | None) -> ModelConfig:
        """The named model's config (None: the default model)."""
        if not self.configs:
            raise ModelNotReady("the model repository has not been read yet; retry shortly")
        name = model if model is not None else next(iter(self.configs))
        if name not in self.configs:
            raise ModelNotFound(f"no model named {name!r}; models: {listing(self.configs)}")
        return self.configs[name]

    def resolve(
        self,
        model: str | None,
        version: int | None = None,
        label: str | None = None,
        *,
        split: bool = False,
        client_key: str | None = None,
    ) -> LoadedVersion:
        """The version a request names: by number, by label, or else the default one.

        The default is the ``stable`` version when that label is set and served, else the
        newest AVAILABLE version (TF Serving's rule): publishing or loading a canary
        beside ``stable`` moves no traffic. With the traffic split on, a ``split``
        request (an inference, not a metadata read) goes to ``canary`` for its share."""
        config = self.config(model)
        served = self.served.get(config.name, {})
        if version is not None and label is not None:
            raise InvalidRequest("name a version or a version label, not both")
        if label is not None:
            version = _label_version(config, label)
        if version is not None:
            if version in served:
                return served[version]
            raise self._not_served(config, version, label)
        if not served:
            states = self.states.get(config.name, {}).values()
            if any(s.state <= VersionState.LOADING for s in states):
                raise ModelNotReady(
                    f"model {config.name!r} has no available version yet"
                    f"{self._hint(config.name)}; retry shortly"
                )
            # Nothing loading: no version found, or every one failed (retried only once
            # its folder changes). NOT_FOUND, as TF Serving and the status route answer;
            # a 503 with Retry-After had clients retry every second for good.
            raise VersionNotFound(
                f"model {config.name!r} has no version to serve{self._hint(config.name)}"
            )
        if split and self.split.canary_share > 0:
            canary = config.labels.get(CANARY_LABEL)
            if canary in served and self.split.to_canary(config.name, client_key):
                return served[canary]  # type: ignore[index]
        stable = config.labels.get(STABLE_LABEL)
        if stable in served:
            return served[stable]  # type: ignore[index]
        return served[max(served)]

    def statuses(self, model: str, version: int | None = None) -> list[VersionStatus]:
        """GetModelStatus: every version tried since start, newest first (TF Serving's
        order: clients read the first as the newest), or the one asked for. There is no
        status by label: TF Serving's GetModelStatus reads only a version number and
        lists every version for a label (get_model_status_impl.cc); a label's version is
        what metadata by label answers (its model_spec)."""
        config = self.config(model)
        states = self.states.get(config.name, {})
        if version is None:
            return [states[v] for v in sorted(states, reverse=True)]
        if version not in states:
            raise VersionNotFound(
                f"model {config.name!r} has no version {version}; versions: "
                f"{listing(sorted(states))}"
            )
        return [states[version]]

    def _not_served(self, config: ModelConfig, version: int, label: str | None) -> CnnserveError:
        what = f"version {version}" if label is None else f"label {label!r} (version {version})"
        known = self.states.get(config.name, {})
        status = known.get(version)
        if status is not None and status.state in (VersionState.START, VersionState.LOADING):
            return ModelNotReady(f"{what} of model {config.name!r} is still loading; retry shortly")
        # Only past every version this worker knows: the disk is read on no other 404.
        if (
            status is None
            and version > max(known, default=-1)
            and _published_since(config, version)
        ):
            # Another worker of this replica may list it AVAILABLE already: each polls on
            # its own, and NOT_FOUND is final to TF Serving's clients.
            return ModelNotReady(
                f"{what} of model {config.name!r} was published moments ago and is not "
                "loaded here yet; retry shortly"
            )
        failed = " (it failed to load)" if status is not None and status.error_code else ""
        available = sorted(self.served.get(config.name, {}))
        return VersionNotFound(
            f"{what} of model {config.name!r} is not served{failed}; available versions: "
            f"{listing(available)}; see GET /v1/models/{config.name}"
        )

    def _hint(self, model: str) -> str:
        states = self.states.get(model, {}).values()
        loading = [s.version for s in states if s.state <= VersionState.LOADING]
        failed = [s.version for s in states if s.error_code]
        if loading:
            return f" (loading version {listing(loading)})"
        if failed:
            return f" (version {listing(failed)} failed to load; see GET /v1/models/{model})"
        # Generic on purpose: the source may be the disk or a TF Serving.
        return f" (no version found to serve; see GET /v1/models/{model})"

    # --- new tables -----------------------------------------------------------------

    def with_configs(self, configs: Iterable[ModelConfig]) -> RoutingTable:
        """New models.config: removed models stop resolving and lose their statuses; their
        loaded versions stay in ``served`` (unreachable) until they are unloaded."""
        by_name = {c.name: c for c in configs}
        states = {m: s for m, s in self.states.items() if m in by_name}
        return replace(self, configs=by_name, states=states)

    def with_state(self, key: VersionKey, status: VersionStatus) -> RoutingTable:
        model, version = key
        if model not in self.configs:  # a removed model's versions report nothing
            return self
        return replace(
            self, states={**self.states, model: {**self.states.get(model, {}), version: status}}
        )

    def with_served(self, loaded: LoadedVersion) -> RoutingTable:
        versions = {**self.served.get(loaded.model, {}), loaded.version: loaded}
        return replace(self, served={**self.served, loaded.model: versions})

    def without(self, keys: Iterable[VersionKey]) -> RoutingTable:
        gone = set(keys)
        served = {
            model: {v: lv for v, lv in versions.items() if (model, v) not in gone}
            for model, versions in self.served.items()
        }
        return replace(self, served={m: vs for m, vs in served.items() if vs})


def hold_labels(
    config: ModelConfig, before: ModelConfig | None, served: Iterable[int], on_disk: Iterable[int]
) -> tuple[ModelConfig, list[tuple[str, int, int]]]:
    """Availability first, for labels too: a label moved to a version that the policy
    serves but that is not ``served`` yet keeps pointing at the version it served until
    then, whether that version is loading or its folder is not there yet (a config
    shipped before the model it names: a ConfigMap and a sync job). TF Serving refuses
    such a config; here a config edited in one step is safe too. A label on a version
    the policy would not serve even once its folder is ``on_disk`` moves at once (and
    answers 404, saying so): waiting for it would wait forever.

    Returns the config to route by and the held labels as (label, old, new)."""
    serving, present = set(served), set(on_disk)
    labels = dict(config.labels)
    waiting = []
    for label, version in config.labels.items():
        old = before.labels.get(label) if before is not None else None
        if old is None or old == version or version in serving:
            continue
        if config.would_serve(version, present) and old in serving:
            labels[label] = old
            waiting.append((label, old, version))
    return (replace(config, labels=labels) if waiting else config), waiting


def _published_since(config: ModelConfig, version: int) -> bool:
    """Whether ``version``'s folder is there and the policy serves it, though this
    worker's last poll did not see it (a stat and a listing, on the 404 path only)."""
    if not (config.base_path / str(version)).is_dir():
        return False
    return config.would_serve(version, version_dirs(config.base_path))


def _label_version(config: ModelConfig, label: str) -> int:
    if label not in config.labels:
        raise UnknownVersionLabel(
            f"model {config.name!r} has no version label {label!r}; "
            f"labels: {listing(sorted(config.labels))}"
        )
    return config.labels[label]


def listing(items: Iterable[object]) -> str:
    """Items for a message a person reads: "1, 2" or "none"."""
    return ", ".join(str(i) for i in items) or "none"
