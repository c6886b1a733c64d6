"""The TLS certificate, followed while serving.

A renewed certificate (cert-manager's renewal, a Kubernetes secret's update, files
replaced by hand) is used for new connections on both ports within
``tls_poll_seconds``, without a restart: REST's context (uvicorn's, in this worker)
loads the files again, and gRPC's credentials hand the new pair to its next handshake.
Connections already open keep the certificate they began with. A pair that does not
load (a certificate without its key, a file half written) is not used: the last good
one stays, one warning says why, ``cnnserve_tls_files_ok`` is 0. The certificate's
expiry is a metric (``cnnserve_tls_certificate_expiry_timestamp_seconds``), and a read
within :data:`EXPIRY_WARNING_DAYS` of it is a warning in the log.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc

from service import metrics
from service.api.auth import Fingerprint, fingerprint
from service.api.tls_files import FILES, load_problem, validity
from service.periodic import every

log = logging.getLogger(__name__)

EXPIRY_WARNING_DAYS = 14  # cert-manager renews at 2/3 of a 90-day life: 30 days before

# REST's contexts in this process: uvicorn's, which its server was started with
# (service.server.GatewayConfig.load notes it), and the one new connections get. A
# renewal never changes a context in use: loading a pair into uvicorn's kept the old
# certificate for clients of the other key type (RSA beside a new EC one: OpenSSL keeps
# a slot per type), and a load that failed half-way left it with a certificate and no
# key. It builds a new context, and uvicorn's hands each new connection to it as the
# client's hello is read (OpenSSL asks the SNI callback with SNI or without).
_rest_started: ssl.SSLContext | None = None
_rest_serving: ssl.SSLContext | None = None


def serve_rest_with(context: ssl.SSLContext | None) -> None:
    """Note the SSLContext uvicorn serves REST with in this worker process."""
    global _rest_started, _rest_serving
    _rest_started = _rest_serving = context
    if context is not None:
        context.sni_callback = _to_serving_context


def _to_serving_context(
    connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, context: ssl.SSLContext
) -> None:
    serving = _rest_serving
    if serving is not None and serving is not context:
        connection.context = serving


def _serve_rest(context: ssl.SSLContext) -> None:
    global _rest_serving
    if _rest_started is not None:
        _rest_serving = context


@dataclass(frozen=True)
class _Pair:
    """A certificate and key that loaded together, as read."""

    cert: bytes
    key: bytes
    seen: tuple[Fingerprint, Fingerprint]
    rest: ssl.SSLContext  # loaded with it, for REST's new connections


class CertificateWatch:
    """Keeps REST and gRPC to the certificate files as they change (see the module)."""

    def __init__(self, certfile: Path, keyfile: Path) -> None:
        self._certfile = certfile
        self._keyfile = keyfile
        self._problem = ""  # the last one logged; "" once the files load
        self._pair: _Pair | None = None  # in use

    def start(self) -> None:
        """Read the pair as the worker starts (blocking); ValueError if it does not load."""
        pair = self._read()
        if isinstance(pair, str):
            raise ValueError(pair)
        self._use(pair)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """gRPC's credentials for one server (a listener): the pair in use, then each pair
        :meth:`follow` loads (gRPC asks before each new connection's handshake). Each
        listener has its own, so that each is handed every new pair (one handed out once
        renewed one listener and left the others with the old certificate)."""
        if self._pair is None:
            raise RuntimeError("start() first")
        handed = self._pair

        def take() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC's threads; None keeps the pair it has.
            nonlocal handed
            pair = self._pair
            if pair is None or pair is handed:
                return None
            handed = pair
            return self._grpc_configuration(pair)

        return grpc.dynamic_ssl_server_credentials(self._grpc_configuration(handed), take)

    @staticmethod
    def _grpc_configuration(pair: _Pair) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(pair.key, pair.cert)])

    def _fingerprints(self) -> tuple[Fingerprint, Fingerprint]:
        return fingerprint(self._certfile), fingerprint(self._keyfile)

    def _read(self) -> _Pair | str:
        """The pair as the files hold it, checked to load together, or why not. Blocking."""
        try:
            seen = self._fingerprints()
            cert, key = self._certfile.read_bytes(), self._keyfile.read_bytes()
        except OSError as exc:
            return _unreadable(exc)
        rest = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        problem = load_problem(self._certfile, self._keyfile, rest)
        if problem:
            return problem
        try:
            if self._fingerprints() != seen:
                return "the TLS files changed while they were read"
        except OSError as exc:
            return _unreadable(exc)
        return _Pair(cert, key, seen, rest)

    def check(self) -> _Pair | None:
        """The pair to use if the files changed and load, else None (a problem is logged
        once and kept to the last good pair). Blocking: call it in a thread."""
        try:
            in_use = self._pair.seen if self._pair is not None else None
            if self._fingerprints() == in_use and not self._problem:
                return None
        except OSError:
            pass  # said by _read
        pair = self._read()
        problem = pair if isinstance(pair, str) else _not_valid_now(self._certfile, pair)
        if isinstance(pair, _Pair) and not problem:
            return pair
        metrics.observe_tls_files(ok=False)
        if problem != self._problem:
            self._problem = problem
            log.warning("%s; new connections keep the certificate read before", problem)
        return None

    def _use(self, pair: _Pair) -> None:
        """Serve ``pair`` to new connections (on the event loop, where REST's connections
        are made)."""
        if self._pair is not None:
            _serve_rest(pair.rest)
            log.info("TLS certificate %s reloaded: new connections use it", self._certfile)
        self._pair, self._problem = pair, ""
        metrics.observe_tls_files(ok=True)
        times = validity(pair.cert)
        if times is not None and times[0] > time.time():
            log.warning(
                "TLS certificate %s is not valid until %s: clients refuse it until then "
                "(check the issuer's clock and this machine's)",
                self._certfile,
                _utc(times[0]),
            )
        expires = None if times is None else times[1]
        if expires is None:
            log.warning(
                "cannot read when TLS certificate %s expires: "
                "cnnserve_tls_certificate_expiry_timestamp_seconds stays as it was",
                self._certfile,
            )
        else:
            metrics.observe_tls_expiry(expires)
            days = (expires - time.time()) / 86400
            if days < EXPIRY_WARNING_DAYS:
                log.warning(
                    "TLS certificate %s %s; renew it (new connections use the renewed "
                    "files within CNNSERVE_TLS_POLL_SECONDS)",
                    self._certfile,
                    f"expired {-days:.1f} days ago" if days < 0 else f"expires in {days:.1f} days",
                )

    async def follow(self, period: float) -> None:
        """Check the files every ``period`` seconds, for good (cancel to stop)."""
        await every(period, self._check_and_use, "checking the TLS files")

    async def _check_and_use(self) -> None:
        pair = await asyncio.to_thread(self.check)
        if pair is not None:
            self._use(pair)


def _unreadable(exc: OSError) -> str:
    return f"TLS file {exc.filename} cannot be read ({exc.strerror or exc}); check {FILES}"


def _not_valid_now(certfile: Path, pair: _Pair) -> str:
    """Why a changed pair must not replace the one in use: its certificate has expired,
    or is not valid yet (a renewal gone wrong, or issued by a clock ahead: clients
    refuse it either way, and the one in use may still be valid). "" if it is valid."""
    times = validity(pair.cert)
    if times is None:
        return ""
    begins, ends = times
    now = time.time()
    if ends <= now:
        return f"TLS certificate {certfile} expired at {_utc(ends)}"
    if begins > now:
        return (
            f"TLS certificate {certfile} is not valid until {_utc(begins)} (check the "
            "issuer's clock and this machine's); it is used once it is"
        )
    return ""


def _utc(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")
