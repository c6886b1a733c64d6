"""Log set-up shared by the CLI and the worker processes uvicorn starts (which begin with
no logging configured, and would otherwise hide their load errors and warnings)."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(*, verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT)
    # httpx logs every request at INFO: `cnnserve verify` sends thousands.
    logging.getLogger("httpx").setLevel(logging.NOTSET if verbose else logging.WARNING)
    # python-multipart writes a WARNING for each malformed body a client sends; the
    # client gets its 400 and the access log has the request.
    logging.getLogger("python_multipart").setLevel(logging.NOTSET if verbose else logging.ERROR)
    if not verbose:
        grpc_core = logging.getLogger("grpc._cython.cygrpc")
        grpc_core.addFilter(_unsent_answers)
        grpc_core.addFilter(_undecodable_metadata)


def _unsent_answers(record: logging.LogRecord) -> bool:
    """grpc.aio logs at ERROR, with a traceback, each call whose answer could not be sent
    because its client left (or its connection was closed with the answer still held):
    200-400 tracebacks when a client holding that many calls disconnects. The client's
    doing, not the server's; the access log has each call."""
    return not record.getMessage().startswith("ExecuteBatchError raised in core")


def _undecodable_metadata(record: logging.LogRecord) -> bool:
    """grpcio logs at ERROR, with a traceback, each metadata value that is not UTF-8 (and
    reads it as Latin-1), every time the call's metadata is read: one unauthenticated
    call of 20 KB with 1,500 such entries wrote 12,001 lines, 942 KB of log. The call
    is answered (a key that is not UTF-8 is a wrong key: 401); the bytes are the
    client's."""
    return not record.getMessage().startswith("Invalid encoding on")
