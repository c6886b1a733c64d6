"""API keys: who may call the gateway, checked once per request on both transports.

With ``CNNSERVE_API_KEYS`` (or ``CNNSERVE_API_KEYS_FILE``) set, a REST request needs
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, a gRPC call ``authorization:
Bearer <key>`` metadata; otherwise it gets 401 / UNAUTHENTICATED. Probes stay open
(``/healthz``, ``/readyz``, gRPC health), as do the API docs and the demo page's own
files (not its data); ``/metrics`` is open unless ``CNNSERVE_METRICS_REQUIRE_KEY``.

A presented key is hashed and compared with every known key's hash by
:func:`hmac.compare_digest`, always against all of them, so the time taken says nothing
about how much of a key was right, nor which key matched. Keys are never logged: the
error says only that a key was missing or unknown.

The key file is followed (:class:`KeyFileWatch`): each worker checks it every
``CNNSERVE_API_KEYS_POLL_SECONDS`` and reads it again when it changed (a Kubernetes
secret's rotation swaps a symlink: another file, another stat), so the workers of a
replica agree on the keys within a period, and a worker started after a rotation does
not hold other keys than its siblings. A read that fails keeps the keys read before; a
worker that has never read the file fails closed (503 ``api_keys_unavailable``) until
it does. Concurrency: the poll reads in a thread and swaps :class:`ApiKeys`' state as
one object; a check reads it once, so it sees the old keys or the new ones, whole.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from service import metrics
from service.api.grpc_calls import refusal_handler
from service.config import API_KEYS_FILE_VAR, read_key_file
from service.errors import ApiKeysUnavailable, Unauthenticated
from service.periodic import every

log = logging.getLogger(__name__)

BEARER = "bearer "
API_KEY_HEADER = "x-api-key"
# Open to everyone whatever the settings: probes, the API description, the demo page's
# own HTML/JS/CSS (its data under /demo/models needs the key like any API route).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/"})
OPEN_PREFIXES = ("/demo/static/", "/static-offline-docs/", "/docs/")
# gRPC services probes and tooling reach without a key.
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/",)
# The metadata a gRPC call may present its key in, once.
KEY_METADATA = ("authorization", API_KEY_HEADER)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class _KeySet:
    digests: tuple[bytes, ...]
    # False: the key file has not been read, so a key outside ``digests`` is unknown,
    # not wrong.
    complete: bool = True


class ApiKeys:
    """The known keys (as hashes) and the check of a presented one."""

    def __init__(
        self, keys: Iterable[str], *, metrics_path: str = "", protect_metrics: bool = False
    ):
        self._state = _KeySet(tuple(_digest(k) for k in keys))
        self.open_paths = (
            OPEN_PATHS if protect_metrics or not metrics_path else OPEN_PATHS | {metrics_path}
        )
        # Checked before the open prefixes: a metrics path under one (/docs/metrics) was
        # served without a key with CNNSERVE_METRICS_REQUIRE_KEY on.
        self._guarded = metrics_path if protect_metrics and metrics_path else None

    @property
    def enabled(self) -> bool:
        state = self._state
        return bool(state.digests) or not state.complete

    def use(self, keys: Iterable[str]) -> None:
        """From now on, these keys (a key file read again)."""
        self._state = _KeySet(tuple(_digest(k) for k in keys))

    def fail_closed(self, keys: Iterable[str]) -> None:
        """Only ``keys`` are known, and they are not all: another key is refused 503
        (:class:`ApiKeysUnavailable`), not 401 (the key file could not be read)."""
        self._state = _KeySet(tuple(_digest(k) for k in keys), complete=False)

    def is_open(self, path: str) -> bool:
        if path == self._guarded:
            return False
        return path in self.open_paths or path.startswith(OPEN_PREFIXES)

    def check(self, presented: str | None) -> None:
        """Pass, or raise Unauthenticated (the same message for a wrong key and none),
        or ApiKeysUnavailable while the keys are not all known."""
        state = self._state  # once: a reload swaps it meanwhile
        if not state.digests and state.complete:
            return
        if presented and "," in presented:
            # No key has a comma (they are configured comma-separated): a header sent
            # twice (joined, RFC 9110 5.3) or a list, where "not valid" sent a client with
            # the right key after it, and which one counted would depend on the proxies.
            raise Unauthenticated(
                f"the API key sent holds {presented.count(',') + 1} values (a header sent "
                "more than once, or a list); send the API key once"
            )
        if presented:
            digest = _digest(presented)
            matched = False
            for known in state.digests:  # no early exit: every key is compared
                matched |= hmac.compare_digest(digest, known)
            if matched:
                return
        if not state.complete:
            raise ApiKeysUnavailable(
                "the server cannot check API keys now: it could not read its key file "
                f"({API_KEYS_FILE_VAR}); retry later, and tell its operator if this lasts "
                "(the server's log says why)"
            )
        raise Unauthenticated(
            "a valid API key is required: send 'Authorization: Bearer <key>' (or 'X-API-Key: "
            "<key>'; gRPC: 'authorization' metadata)"
            if not presented
            else "the API key is not valid; check the key you were given"
        )


Fingerprint = tuple[int, int, int, int]


def fingerprint(path: Path) -> Fingerprint:
    """What changes when the file's content may have: its stat, through the symlinks (a
    secret's rotation points them at another file)."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class KeyFileWatch:
    """Keeps ``keys`` to the variable's keys plus the key file's as the file changes:
    read again when its fingerprint changed, and after a failed read at every check
    (a file made readable again by chmod changes no fingerprint). One log line per
    distinct problem, one when the keys were read again (their count, never a key);
    ``cnnserve_api_keys_file_ok`` says which it was."""

    def __init__(self, path: Path, env_keys: frozenset[str], keys: ApiKeys) -> None:
        self._path = path
        self._env_keys = env_keys
        self._keys = keys
        self._read: Fingerprint | None = None  # of the file when last read well
        self._problem = ""  # the last one logged; "" once the file reads well

    def load(self, *, may_fail: bool = True) -> None:
        """Read the file if it changed (blocking: at a worker's start, else in a thread).
        A read that fails is logged and kept to, or with ``may_fail=False`` raises
        ValueError."""
        try:
            seen = fingerprint(self._path)
            if seen == self._read and not self._problem:
                return
            keys = read_key_file(self._path)
        except OSError as exc:
            problem = f"{API_KEYS_FILE_VAR} {self._path}: {exc.strerror or exc}"
        except ValueError as exc:
            problem = str(exc)
        else:
            self._keys.use(self._env_keys | keys)
            metrics.observe_api_keys_file(True)
            if self._read is not None or self._problem:
                log.info("API keys reloaded from %s: %d key(s)", self._path, len(keys))
            self._read, self._problem = seen, ""
            return
        if not may_fail:
            raise ValueError(problem)
        self._failed(problem)

    def _failed(self, problem: str) -> None:
        metrics.observe_api_keys_file(False)
        if self._read is None:  # never read: no keys of the file to keep
            self._keys.fail_closed(self._env_keys)
        if problem == self._problem:
            return
        self._problem = problem
        if self._read is None:
            log.error(
                "%s; requests that need a key get 503 api_keys_unavailable until it reads",
                problem,
            )
        else:
            log.warning("%s; the keys read before stay in use", problem)

    async def follow(self, period: float) -> None:
        """Check the file every ``period`` seconds, for good (cancel to stop)."""
        await every(period, lambda: asyncio.to_thread(self.load), f"checking {self._path}")


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key a client sent, from ``Authorization: Bearer`` or ``X-API-Key``. Sent in
    both, the two must agree: a wrong ``X-API-Key`` beside a right bearer key was
    ignored (and the other way round refused), so which one counted depended on the
    header, and a proxy that reads the other would judge the request otherwise."""
    bearer = None
    if authorization and authorization[: len(BEARER)].lower() == BEARER:
        bearer = authorization[len(BEARER) :].strip()
    header = (api_key or "").strip() or None
    if bearer is not None and header is not None and bearer != header:
        raise Unauthenticated(
            "two different API keys were sent ('Authorization: Bearer' and 'X-API-Key'); "
            "send the key once"
        )
    return bearer if bearer is not None else header


# What a call to a method the server does not have is refused with, whatever its
# shape: request-streaming, so nothing waits for a message (service.api.grpc_calls).
_NOT_SERVED = grpc.stream_stream_rpc_method_handler(lambda requests, context: iter(()))


class GrpcApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without a valid key (UNAUTHENTICATED), except health checks.

    A method the server does not have is refused the same way: answered UNIMPLEMENTED
    before the key was looked at, it told a caller without a key which methods exist
    (REST answers 401 to any path but the open ones, served or not). Its route label is
    ``unmatched``, as REST's for a path not served: method names are the caller's. With
    a valid key, it is UNIMPLEMENTED as before."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        details: Any,
    ) -> Any:
        handler = await continuation(details)
        method = str(details.method)
        if method.startswith(OPEN_GRPC_PREFIXES):
            return handler
        try:
            self._keys.check(_metadata_key(details.invocation_metadata or ()))
        except Unauthenticated as exc:
            if handler is None:
                return refusal_handler(_NOT_SERVED, exc, metrics.UNMATCHED_ROUTE)
            return refusal_handler(handler, exc, method)
        return handler


def _metadata_key(metadata: Iterable[tuple[str, Any]]) -> str | None:
    """The key a call presents. Sent twice, it is refused (as REST refuses two headers):
    which one counted would depend on how each proxy on the way merged them."""
    values: dict[str, list[str]] = {name: [] for name in KEY_METADATA}
    for name, value in metadata:
        if name in values:
            values[name].append(str(value))
    for name, sent in values.items():
        if len(sent) > 1:
            raise Unauthenticated(
                f"{len(sent)} '{name}' metadata values were sent; send the API key once"
            )
    authorization, api_key = values["authorization"], values[API_KEY_HEADER]
    return presented_key(
        authorization[0] if authorization else None, api_key[0] if api_key else None
    )
