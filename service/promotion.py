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
from typing import Any, Protocol, TextIO

import httpx

from service.client_trust import https_verify, untrusted
from service.config_edit import set_labels, set_specific_versions, validate
from service.contract import STABLE_LABEL
from service.errors import (
    ModelNotFound,
    NoServer,
    PromotionError,
    VersionFailedToLoad,
    VersionNotFound,
)
from service.repository import ModelConfig, version_dirs

# How often a wait for AVAILABLE asks, and for how long by default.
WAIT_PERIOD_SECONDS = 0.25
DEFAULT_WAIT_SECONDS = 300.0
# A gateway's workers each reload models.config on their own poll, and any one of them
# answers a status request: a step counts as done once this many answers in a row, each
# on a new connection, agree. A worker still behind is missed when none of them reach it:
# with 2 workers 2^-16 (it was 8 answers, 2^-8: a test's flake in 256), with 4 (3/4)^16
# = 1%, with 8 12%. New connections cost ~1 ms each here.
SETTLED_ANSWERS = 16
# A failure the first answer already shows may be left from before this promotion (the
# server retries a failed version once its folder changes, on its next poll): believed
# once it has stood this long.
STALE_FAILURE_SECONDS = 10.0


# The 404s a gateway answers on a model's status routes (service.errors).
MODEL_NOT_FOUND_CODES = (ModelNotFound.code, VersionNotFound.code)


@dataclass(frozen=True)
class Step:
    name: str  # load, label or drop
    summary: str  # one line a person reads
    text: str  # the whole models.config after this step
    changed: bool  # False: the config already was like this
    # The load step's: models.config to go back to if the version does not load (None:
    # leave it as it is).
    undo: str | None = None


def plan(
    text: str,
    repository: Path,
    model: str,
    version: int,
    label: str,
    on_disk: Iterable[int],
    serving: Iterable[int] | None = None,
    unknown: str | None = None,
) -> list[Step]:
    """The three configs of a promotion of ``model`` ``version`` to ``label``.

    ``on_disk``: the model's published versions (what a ``latest``/``all`` policy serves
    among). ``serving``: the versions a server reports AVAILABLE, when one answered: what
    a ``latest`` policy pins is what it serves, not the newest folders (a broken newest
    version is not served and must not be pinned; the one still serving must stay).
    ``unknown``: why ``serving`` is None when a server should have said it (none
    answered at the address given): a ``latest`` policy is then not pinned from the
    newest folders, which could drop the version a server elsewhere serves.
    Every step's text is validated as TF Serving would parse it.
    """
    if version < 0:
        raise PromotionError(f"version must be 0 or more, got {version}")
    if not label or not all(c.isalnum() or c in "_-" for c in label):
        raise PromotionError(f"label {label!r}: use letters, digits, '_' or '-'")
    config = _config(text, repository, model)
    steps = []

    wanted = config.wanted_versions(on_disk)
    if config.policy == "latest" and serving is not None:
        wanted = set(serving)
    elif config.policy == "latest" and unknown is not None:
        # A mistyped --url: pinning versions 1 and a broken 3 unloaded the 2 being
        # served by the gateway that polls the file (an outside review).
        raise PromotionError(
            f"{unknown}: what {model}'s latest policy serves is unknown, and pinning the "
            f"newest folders ({_listing(sorted(wanted))}) could unload the version a server "
            "serves. Check --url (the gateway's REST address), or pass --no-wait when no "
            "server serves this repository; nothing was written"
        )
    undo: str | None = text  # before the load step
    if version in wanted and config.policy != "latest":
        after_load = text
        summary = f"version {version} is already served by the {config.policy} policy"
        # Perhaps put there by an earlier promote of it, interrupted or run with
        # --no-wait: if it does not load, take it out again, unless a label points at
        # it or it is all the policy serves.
        undo = None
        others = sorted(wanted - {version})
        if config.policy == "specific" and others and version not in config.labels.values():
            undo = set_specific_versions(text, model, others)
    else:
        # A label pins its version: under a latest policy the next version published
        # would unload it (and the label would point at nothing served).
        keep = sorted(wanted | {version})
        after_load = set_specific_versions(text, model, keep)
        why = f"add {version}" if version not in wanted else "a latest policy would unload it"
        summary = f"serve versions {_listing(keep)} as a specific policy ({why})"
    # What unlabelled requests get now: the newest version served (the server's word;
    # the policy's folders only when none answered, with --no-wait).
    served_now = set(serving) if serving else wanted
    default = max(served_now, default=None)
    if (
        label != STABLE_LABEL
        and STABLE_LABEL not in config.labels
        and default is not None
        and default != version
    ):
        # Unlabelled requests go to `stable`, else to the newest version served: with no
        # `stable`, loading a canary newer than the served version moved all of them to
        # it in step 1, before its label did (an outside audit, 12-07). Pinned to what
        # they get now (unless that is the version promoted: nothing would move).
        after_load = set_labels(after_load, model, {**config.labels, STABLE_LABEL: default})
        summary += (
            f"; label {STABLE_LABEL!r} → version {default}, what unlabelled requests get "
            f"now (without it they would go to the newest version served)"
        )
    steps.append(Step("load", summary, after_load, after_load != text, undo))
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
    e.g. a TF Serving's own volume): numbered folders holding a SavedModel (an empty
    one was promoted with --no-wait, and pinned in place of the version served)."""
    folders = version_dirs(_config(config_text, repository, model).base_path)
    return sorted(
        v
        for v, folder in folders.items()
        if (folder / "saved_model.pb").is_file() or (folder / "saved_model.pbtxt").is_file()
    )


# --- applying the steps ---------------------------------------------------------------------

Apply = Callable[[str], None]


class Waiter(Protocol):
    """What promote waits on: a gateway, or a TF Serving."""

    def available(self, model: str, version: int) -> None:
        """Return once ``version`` is AVAILABLE; PromotionError when it failed to load."""

    def labelled(self, model: str, label: str, version: int) -> None:
        """Return once ``label`` resolves to ``version`` wherever requests are answered."""


def promote(
    steps: list[Step],
    *,
    model: str,
    version: int,
    label: str,
    apply: Apply,
    wait: Waiter | None,
    dry_run: bool,
    out: TextIO,
) -> None:
    """Apply each changed step; after load, wait until the version is AVAILABLE, and
    after label, until the label resolves to it everywhere, so that the drop (and the
    caller's next command, `verify --label`) meets a server that has moved (``wait``
    None: do not wait, the caller said so). A version that does not load undoes the load
    step (the config it names, :attr:`Step.undo`), so no broken version stays in the
    policy. ``--dry-run`` prints every intermediate config instead."""
    for number, step in enumerate(steps, 1):
        print(f"step {number}/{len(steps)} ({step.name}): {step.summary}", file=out)
        if dry_run:
            if step.changed:
                print(f"--- models.config after step {number} ---", file=out)
                print(step.text.rstrip("\n"), file=out)
            continue
        if step.changed:
            apply(step.text)
        if wait is None:
            continue
        if step.name == "load":
            print(f"waiting until {model} version {version} is AVAILABLE ...", file=out)
            try:
                wait.available(model, version)
            except NoServer:  # none answers: what it will serve is unknown, left to a rerun
                raise
            except PromotionError:  # failed to load, or not AVAILABLE in time
                _undo_load(step, version, apply, out)
                raise
            print(f"{model} version {version} is AVAILABLE", file=out)
        elif step.name == "label" and step.changed:
            print(f"waiting until label {label!r} is version {version} everywhere ...", file=out)
            wait.labelled(model, label, version)


def _undo_load(step: Step, version: int, apply: Apply, out: TextIO) -> None:
    """Take the version the wait did not see AVAILABLE out of the policy again: one that
    failed, and one that did not load in time too (left in a specific policy, it took
    every unlabelled request once it loaded: the newest version served answers them)."""
    if step.undo is None:
        print(
            f"version {version} stays in models.config's policy (a label points at it, it "
            "is all the policy serves, or the policy serves every version): take it out by "
            "hand",
            file=out,
        )
        return
    apply(step.undo)
    print(
        "step 1 undone: models.config is as it was before"
        if step.changed
        else f"version {version} taken out of the policy again (an earlier promote had put "
        "it there): no version that did not load stays in models.config",
        file=out,
    )


class _Failure:
    """A version's load failure as the waits see it: believed at once when it appears
    during the wait, after STALE_FAILURE_SECONDS when the first answer already showed it
    (left from an earlier attempt, retried on the server's next poll)."""

    def __init__(self) -> None:
        self._first: str | None = None
        self._seen_other = False
        self._since = time.monotonic()

    def check(self, model: str, version: int, state: str, error: str) -> None:
        failed = state == "END" and bool(error)
        if failed and self._first is None and not self._seen_other:  # the first answer
            self._first = error
            self._since = time.monotonic()
            return
        if not failed:
            self._seen_other = True
            self._first = None
            return
        if self._first is None or error != self._first or self._stale_for_long():
            raise VersionFailedToLoad(f"{model} version {version} failed to load: {error}")

    def _stale_for_long(self) -> bool:
        return time.monotonic() - self._since >= STALE_FAILURE_SECONDS


class GatewayStatus:
    """Waits on a gateway's TF-Serving-style status routes, each answer on a new
    connection (any of its workers may answer; all must have moved)."""

    def __init__(
        self,
        url: str,
        timeout: float,
        headers: dict[str, str] | None = None,
        *,
        ca_cert: Path | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise PromotionError(f"--url {url!r} needs its scheme, e.g. http://127.0.0.1:8000")
        try:
            httpx.URL(url)
        except httpx.InvalidURL as exc:  # not an httpx.HTTPError: it was a traceback
            raise PromotionError(f"--url {url!r} is not a URL ({exc})") from None
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.unreachable: str | None = None  # why serving() could not say, when none answered
        self.headers = headers or {}
        self._verify = https_verify(ca_cert)
        self._ca_cert = ca_cert

    def _get(self, path: str) -> httpx.Response:
        try:
            response = httpx.get(
                f"{self.url}{path}", timeout=5, headers=self.headers, verify=self._verify
            )
        except httpx.HTTPError as exc:
            # A gateway that answers but is not trusted is there: saying "no gateway"
            # would have planned without what it serves and written step 1.
            if (message := untrusted(self.url, exc, self._ca_cert)) is not None:
                raise PromotionError(message) from None
            raise NoServer(f"no gateway answers at {self.url} ({exc})") from None
        if response.status_code in (401, 403):
            raise PromotionError(
                f"{self.url}{path} answered {response.status_code}: promote sends the key "
                "the server reads (CNNSERVE_API_KEYS or CNNSERVE_API_KEYS_FILE); set it "
                "in this command's environment too"
            )
        self._check_gateway(path, response)
        return response

    def _check_gateway(self, path: str, response: httpx.Response) -> None:
        """Whatever else answered is not a gateway (TF Serving's REST status routes): a
        web server's 404 page was read as "not polled yet", and promote planned without
        what was served, pinned a broken version and waited out its timeout."""
        if response.status_code >= 500:  # busy or restarting (a proxy's page, too): retried
            return
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200:
            key = "error"
        else:
            key = "model_spec" if path.endswith("/metadata") else "model_version_status"
        if not isinstance(body, dict) or key not in body:
            raise PromotionError(
                f"{self.url}{path} answered {response.status_code} "
                f"({response.headers.get('content-type', 'no content type')}), not as a "
                "cnnserve gateway or TF Serving would: is --url the REST address of the "
                "gateway serving this repository?"
            )
        # A cnnserve port without the route (its probe port: `{"error": "port 9722 serves
        # GET /healthz ... only"}`) answers a 404 like a gateway's for a model it does not
        # know yet, but names another error: read as "not polled yet", promote planned
        # without what was served, pinned a broken newest folder and unloaded the version
        # a server served (an outside audit, 12-07). TF Serving names none.
        code = response.headers.get("x-error-code")
        if response.status_code == 404 and code not in (None, *MODEL_NOT_FOUND_CODES):
            raise PromotionError(
                f"{self.url}{path} answered 404 {code}: {str(body['error'])[:200]}; is "
                "--url the gateway's REST address (not its probe port)?"
            )

    def serving(self, model: str) -> set[int] | None:
        """The versions of ``model`` the gateway reports AVAILABLE; None when no gateway
        answers (or it does not know the model yet)."""
        try:
            response = self._get(f"/v1/models/{model}")
        except NoServer as exc:
            self.unreachable = exc.message
            return None
        if response.status_code >= 500:
            # A gateway whose TF Serving cannot be reached answers 503: what is served
            # is unknown, and planning without it could pin a broken newest version.
            raise PromotionError(
                f"{self.url}/v1/models/{model} answered {response.status_code} "
                f"({response.text[:200]}): what it serves is unknown; rerun once it answers"
            )
        if response.status_code != 200:
            return None
        statuses = response.json().get("model_version_status", [])
        return {int(s["version"]) for s in statuses if s.get("state") == "AVAILABLE"}

    def available(self, model: str, version: int) -> None:
        route = f"/v1/models/{model}/versions/{version}"
        deadline = time.monotonic() + self.timeout
        state, agreeing, failure = "not seen yet", 0, _Failure()
        while True:
            response = self._get(route)
            if response.status_code == 200:
                status = response.json()["model_version_status"][0]
                state = status["state"]
                error = status.get("status", {}).get("error_message", "")
                failure.check(model, version, state, error)
                agreeing = agreeing + 1 if state == "AVAILABLE" else 0
                if agreeing >= SETTLED_ANSWERS:
                    return
                if agreeing:
                    continue  # ask again at once: another worker may answer
            elif response.status_code == 404:  # the gateway has not polled yet
                agreeing = 0
            elif response.status_code >= 500:
                # Its TF Serving cannot be reached for now (503), or it restarts: either
                # may pass within the wait.
                agreeing, state = 0, f"the gateway answered {response.status_code}"
            else:
                raise PromotionError(
                    f"{self.url}{route} answered {response.status_code}: {response.text[:200]}"
                )
            _wait_or_time_out(deadline, model, version, state, self.timeout)

    def labelled(self, model: str, label: str, version: int) -> None:
        # The version a label names is in its metadata's model_spec, as TF Serving's
        # (its status by label lists every version).
        route = f"/v1/models/{model}/labels/{label}/metadata"

        def ask() -> str | None:
            response = self._get(route)
            if response.status_code != 200:
                return None
            return f"version {response.json()['model_spec'].get('version', 'none')}"

        _wait_for_label(ask, model, label, version, self.timeout)


class TFServingStatus:
    """Waits on a TF Serving's ModelService.GetModelStatus, and for a label on its
    GetModelMetadata by label, asked on new connections: a TF Serving is one process,
    whose reloaded config is applied when HandleReloadConfigRequest answers, but a
    cnnserve gateway's gRPC port is several worker processes, the others following the
    reload on their next poll (one channel asked one of them, and promote said the label
    had moved everywhere while another worker answered the old version for ~1 s: an
    outside audit, 12-07)."""

    def __init__(self, client: Any, timeout: float, connect: Callable[[], Any]) -> None:
        self.client = client  # service.runtimes.tfserving.TFServingClient
        self.timeout = timeout
        self.connect = connect  # a client on a connection of its own, same address

    def available(self, model: str, version: int) -> None:
        from service.errors import BackendUnavailable, NotFound
        from service.proto_gen.tensorflow_serving.apis import get_model_status_pb2
        from service.tfserving_proto import model_spec

        deadline = time.monotonic() + self.timeout
        state, failure = "not seen yet", _Failure()
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
                failure.check(model, version, state, status.status.error_message)
            _wait_or_time_out(deadline, model, version, state, self.timeout)

    def labelled(self, model: str, label: str, version: int) -> None:
        """Return once ``label`` names ``version`` in SETTLED_ANSWERS metadata answers in
        a row, each on a new connection (a worker process of its own, as likely as not)."""
        from service.errors import CnnserveError
        from service.proto_gen.tensorflow_serving.apis import get_model_metadata_pb2
        from service.tfserving_proto import model_spec

        spec = model_spec(model)
        spec.version_label = label
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=spec, metadata_field=["signature_def"]
        )

        def ask() -> str:
            client = self.connect()
            try:
                answer = client.call("GetModelMetadata", request)
                return f"version {answer.model_spec.version.value}"
            except CnnserveError as exc:
                return f"an error ({exc.message})"
            finally:
                client.close()

        _wait_for_label(ask, model, label, version, self.timeout)


def _wait_for_label(
    ask: Callable[[], str | None], model: str, label: str, version: int, limit: float
) -> None:
    """Return once ``ask`` (what the label names, by one answer: "version 3", or what
    came instead; None for no answer) says ``version`` SETTLED_ANSWERS times in a row:
    each answer may come from another worker."""
    deadline = time.monotonic() + limit
    agreeing, seen = 0, "not seen yet"
    while agreeing < SETTLED_ANSWERS:
        answer = ask()
        seen = answer or seen  # no answer: the last one is what to report
        moved = answer == f"version {version}"
        agreeing = agreeing + 1 if moved else 0
        if moved:
            continue
        if time.monotonic() > deadline:
            raise PromotionError(
                f"label {label!r} of {model} still answers {seen} after {limit:.0f}s "
                f"(models.config says {version}): is every worker polling this repository? "
                "Check the server's log"
            )
        time.sleep(WAIT_PERIOD_SECONDS)


def _wait_or_time_out(deadline: float, model: str, version: int, state: str, limit: float) -> None:
    if time.monotonic() > deadline:
        raise PromotionError(
            f"{model} version {version} is not AVAILABLE after {limit:.0f}s (state: {state}); "
            "the label was not moved. Check the server's log, then rerun the same command"
        )
    time.sleep(WAIT_PERIOD_SECONDS)
