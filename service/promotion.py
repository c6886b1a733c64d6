"""`cnnserve promote`: move a version label (canary, stable) in safe steps.

TF Serving refuses a label that points at a version it has not loaded, so moving a label
to a new version takes two config changes in order, and a third to let go of what is
no longer needed:

1. *load*: the version policy serves the version (a ``specific`` policy gets it added;
   a ``latest`` policy becomes ``specific``, since the next version published would
   unload a labelled one; an ``all`` policy that does not cover it too), and the
   version is waited for until AVAILABLE;
2. *label*: the label points at the version;
3. *drop*: the version the label pointed at before leaves a ``specific`` policy when no
   label points at it any more.

:func:`plan` computes the three configs from the text of models.config (edited in place
by :mod:`service.config_edit`, comments kept); :func:`promote` applies them one by one
with the waits in between, through callables, so the same steps go to a file or to a
TF Serving's HandleReloadConfigRequest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx

from service.config_edit import set_labels, set_specific_versions, validate
from service.errors import NoServer, PromotionError
from service.repository import ModelConfig, version_dirs

# How often a wait for AVAILABLE asks, and for how long by default.
WAIT_PERIOD_SECONDS = 0.25
DEFAULT_WAIT_SECONDS = 300.0


@dataclass(frozen=True)
class Step:
    name: str  # load, label or drop
    summary: str  # one line a person reads
    text: str  # the whole models.config after this step
    changed: bool  # False: the config already was like this


def plan(
    text: str, repository: Path, model: str, version: int, label: str, on_disk: Iterable[int]
) -> list[Step]:
    """The three configs of a promotion of ``model`` ``version`` to ``label``.

    ``on_disk``: the model's published versions (what a ``latest``/``all`` policy serves
    among). Every step's text is validated as TF Serving would parse it.
    """
    if version <= 0:
        raise PromotionError(f"version must be a positive integer, got {version}")
    if not label or not all(c.isalnum() or c in "_-" for c in label):
        raise PromotionError(f"label {label!r}: use letters, digits, '_' or '-'")
    config = _config(text, repository, model)
    steps = []

    wanted = config.wanted_versions(on_disk)
    if version in wanted and config.policy != "latest":
        after_load = text
        summary = f"version {version} is already served by the {config.policy} policy"
    else:
        # A label pins its version: under a latest policy the next version published
        # would unload it (and the label would point at nothing served).
        keep = sorted(wanted | {version})
        after_load = set_specific_versions(text, model, keep)
        why = f"add {version}" if version not in wanted else "a latest policy would unload it"
        summary = f"serve versions {_listing(keep)} as a specific policy ({why})"
    steps.append(Step("load", summary, after_load, after_load != text))
    config = _config(after_load, repository, model)

    previous = config.labels.get(label)
    labels = {**config.labels, label: version}
    after_label = set_labels(after_load, model, labels)
    summary = (
        f"label {label!r} already points at version {version}"
        if previous == version
        else f"label {label!r} → version {version}"
        + (f" (was {previous})" if previous is not None else "")
    )
    steps.append(Step("label", summary, after_label, after_label != after_load))
    config = _config(after_label, repository, model)

    after_drop, summary = after_label, "nothing to drop"
    still_labelled = set(config.labels.values())
    if (
        config.policy == "specific"
        and previous is not None
        and previous not in still_labelled
        and previous in config.versions
    ):
        keep = sorted(set(config.versions) - {previous})
        after_drop = set_specific_versions(after_label, model, keep)
        summary = f"drop version {previous} (no label points at it); serve {_listing(keep)}"
    steps.append(Step("drop", summary, after_drop, after_drop != after_label))
    _config(after_drop, repository, model)
    return steps


def _config(text: str, repository: Path, model: str) -> ModelConfig:
    configs = validate(text, repository)
    for config in configs:
        if config.name == model:
            return config
    names = ", ".join(sorted(c.name for c in configs)) or "none"
    raise PromotionError(f"models.config has no model {model!r} (models there: {names})")


def _listing(versions: Iterable[int]) -> str:
    return ", ".join(str(v) for v in versions)


def published_versions(config_text: str, repository: Path, model: str) -> list[int]:
    """The versions of ``model`` in its folder on this disk (empty when it is not here,
    e.g. a TF Serving's own volume)."""
    return sorted(version_dirs(_config(config_text, repository, model).base_path))


# --- applying the steps ---------------------------------------------------------------------

Apply = Callable[[str], None]
WaitAvailable = Callable[[str, int], None]


def promote(
    steps: list[Step],
    *,
    model: str,
    version: int,
    apply: Apply,
    wait: WaitAvailable | None,
    dry_run: bool,
    out: TextIO,
) -> None:
    """Apply each changed step; between load and label, wait until the version is
    AVAILABLE (``wait`` None: do not wait, the caller said so). ``--dry-run`` prints every
    intermediate config instead."""
    for number, step in enumerate(steps, 1):
        print(f"step {number}/{len(steps)} ({step.name}): {step.summary}", file=out)
        if dry_run:
            if step.changed:
                print(f"--- models.config after step {number} ---", file=out)
                print(step.text.rstrip("\n"), file=out)
            continue
        if step.changed:
            apply(step.text)
        if step.name == "load" and wait is not None:
            print(f"waiting until {model} version {version} is AVAILABLE ...", file=out)
            wait(model, version)
            print(f"{model} version {version} is AVAILABLE", file=out)


class GatewayStatus:
    """Waits on a gateway's TF-Serving-style status route (GET /v1/models/m/versions/v)."""

    def __init__(self, url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.headers = headers or {}

    def __call__(self, model: str, version: int) -> None:
        route = f"{self.url}/v1/models/{model}/versions/{version}"
        deadline = time.monotonic() + self.timeout
        state = "not seen yet"
        while True:
            try:
                response = httpx.get(route, timeout=5, headers=self.headers)
            except httpx.HTTPError as exc:
                raise NoServer(f"no gateway answers at {self.url} ({exc})") from None
            if response.status_code == 200:
                status = response.json()["model_version_status"][0]
                state = status["state"]
                if state == "AVAILABLE":
                    return
                error = status.get("status", {}).get("error_message", "")
                if state == "END" and error:
                    raise PromotionError(f"{model} version {version} failed to load: {error}")
            elif response.status_code != 404:  # 404: the gateway has not polled yet
                raise PromotionError(
                    f"{route} answered {response.status_code}: {response.text[:200]}"
                )
            _wait_or_time_out(deadline, model, version, state, self.timeout)


class TFServingStatus:
    """Waits on a TF Serving's ModelService.GetModelStatus."""

    def __init__(self, client: Any, timeout: float) -> None:
        self.client = client  # service.runtimes.tfserving.TFServingClient
        self.timeout = timeout

    def __call__(self, model: str, version: int) -> None:
        from service.errors import BackendUnavailable, NotFound
        from service.proto_gen.tensorflow_serving.apis import get_model_status_pb2
        from service.tfserving_proto import model_spec

        deadline = time.monotonic() + self.timeout
        state = "not seen yet"
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=model_spec(model, version))
        while True:
            try:
                answer = self.client.call("GetModelStatus", request)
            except BackendUnavailable as exc:
                raise NoServer(f"TF Serving at {self.client.address} cannot be reached") from exc
            except NotFound:
                answer = None
            for status in answer.model_version_status if answer is not None else ():
                state = get_model_status_pb2.ModelVersionStatus.State.Name(status.state)
                if state == "AVAILABLE":
                    return
                if state == "END" and status.status.error_message:
                    raise PromotionError(
                        f"{model} version {version} failed to load: {status.status.error_message}"
                    )
            _wait_or_time_out(deadline, model, version, state, self.timeout)


def _wait_or_time_out(deadline: float, model: str, version: int, state: str, limit: float) -> None:
    if time.monotonic() > deadline:
        raise PromotionError(
            f"{model} version {version} is not AVAILABLE after {limit:.0f}s (state: {state}); "
            "the label was not moved. Check the server's log, then rerun the same command"
        )
    time.sleep(WAIT_PERIOD_SECONDS)
