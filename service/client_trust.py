"""How the command-line clients of a live server (`cnnserve verify`, `cnnserve promote`,
`cnnserve bench --url`) trust its TLS certificate: the usual roots (httpx's bundle for
REST, gRPC's own), or with ``--ca-cert`` a PEM file as well (a gateway's self-signed
certificate, a private CA's); and which API key they send."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

    from service.config import Settings


def api_key_headers(settings: Settings) -> dict[str, str]:
    """The gateway's own API key (CNNSERVE_API_KEYS or its file, as the server reads
    them) for the commands that call its API (REST header, gRPC metadata): with keys
    on, every call was a 401 / UNAUTHENTICATED. ValueError for an unreadable key file,
    or one that holds no key."""
    keys = settings.keys()
    return {"authorization": f"Bearer {min(keys)}"} if keys else {}


def https_verify(ca_cert: Path | None) -> ssl.SSLContext | bool:
    """httpx's ``verify``: its default roots (certifi's bundle), plus ``ca_cert``."""
    if ca_cert is None:
        return True
    import certifi  # httpx's own roots: a --ca-cert adds to them, it does not swap them

    context = ssl.create_default_context(cafile=certifi.where())
    context.load_verify_locations(cafile=str(ca_cert))
    return context


def untrusted(url: str, exc: BaseException, ca_cert: Path | None = None) -> str | None:
    """What to tell when a client's connection error was a TLS one (an untrusted
    certificate, a port that does not speak TLS, an http:// URL to one that does): the
    server is there, so not "is it running?" but what to change. None when it was not.
    ``ca_cert``: the --ca-cert given, if one was."""
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, ssl.SSLError):
            if cause.reason == "WRONG_VERSION_NUMBER":  # its answer was no TLS record
                return f"{url} answered, but that port does not speak TLS ({cause}): use http://"
            fix = (
                "give its certificate with --ca-cert"
                if ca_cert is None  # "give it" to a command given one was no help
                else f"--ca-cert {ca_cert} does not vouch for it: give the certificate "
                "it serves, or the CA's that signed it"
            )
            return (
                f"{url} answered, but not over a TLS connection this command trusts "
                f"({cause}): {fix}"
            )
    if url.startswith("http://") and any(_closed_unanswered(cause) for cause in causes):
        # A TLS port takes the request for a bad handshake and closes the connection.
        return (
            f"{url} closed the connection without answering ({exc}); if that port "
            "speaks TLS, use https://"
        )
    return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        yield cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__


def _closed_unanswered(exc: BaseException) -> bool:
    """The server closed (httpx: "Server disconnected without sending a response") or
    reset the connection before any answer."""
    import httpx

    if isinstance(exc, httpx.RemoteProtocolError):  # not a malformed answer, say
        return str(exc).startswith("Server disconnected")
    return isinstance(exc, ConnectionResetError)


def grpc_credentials(ca_cert: Path | None) -> grpc.ChannelCredentials:
    """A TLS channel's credentials: gRPC's own roots, or ``ca_cert`` instead (gRPC takes
    one bundle: a private CA's file must hold its root)."""
    import grpc

    return grpc.ssl_channel_credentials(ca_cert.read_bytes() if ca_cert is not None else None)
