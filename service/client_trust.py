"""How the command-line clients of a live server (`cnnserve verify`, `cnnserve promote`)
trust its TLS certificate: the system's roots, or with ``--ca-cert`` a PEM file as well
(a gateway's self-signed certificate, a private CA's)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


def https_verify(ca_cert: Path | None) -> ssl.SSLContext | bool:
    """httpx's ``verify``: its default roots, or the system's plus ``ca_cert``."""
    if ca_cert is None:
        return True
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=str(ca_cert))
    return context


def grpc_credentials(ca_cert: Path | None) -> grpc.ChannelCredentials:
    """A TLS channel's credentials: gRPC's own roots, or ``ca_cert`` instead (gRPC takes
    one bundle: a private CA's file must hold its root)."""
    import grpc

    return grpc.ssl_channel_credentials(ca_cert.read_bytes() if ca_cert is not None else None)
