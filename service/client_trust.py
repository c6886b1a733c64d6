"""How the command-line clients of a live server (`cnnserve verify`, `cnnserve promote`)
trust its TLS certificate: the usual roots (httpx's bundle for REST, gRPC's own), or with
``--ca-cert`` a PEM file as well (a gateway's self-signed certificate, a private CA's)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


def https_verify(ca_cert: Path | None) -> ssl.SSLContext | bool:
    """httpx's ``verify``: its default roots (certifi's bundle), plus ``ca_cert``."""
    if ca_cert is None:
        return True
    import certifi  # httpx's own roots: a --ca-cert adds to them, it does not swap them

    context = ssl.create_default_context(cafile=certifi.where())
    context.load_verify_locations(cafile=str(ca_cert))
    return context


def untrusted(url: str, exc: BaseException) -> str | None:
    """What to tell when a client's connection error was a TLS one (an untrusted
    certificate, a plaintext server): the server answered, so not "is it running?"
    but a hint at --ca-cert. None when it was not."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLError):
            return (
                f"{url} answered, but not over a TLS connection this command trusts "
                f"({cause}): give its certificate with --ca-cert"
            )
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def grpc_credentials(ca_cert: Path | None) -> grpc.ChannelCredentials:
    """A TLS channel's credentials: gRPC's own roots, or ``ca_cert`` instead (gRPC takes
    one bundle: a private CA's file must hold its root)."""
    import grpc

    return grpc.ssl_channel_credentials(ca_cert.read_bytes() if ca_cert is not None else None)
