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
        logging.getLogger("grpc._cython.cygrpc").addFilter(_unsent_answers)


def _unsent_answers(record: logging.LogRecord) -> bool:
    """grpc.aio logs at ERROR, with a traceback, each call whose answer could not be sent
    because its client left (or its connection was closed with the answer still held):
    200-400 tracebacks when a client holding that many calls disconnects. The client's
    doing, not the server's; the access log has each call."""
    return not record.getMessage().startswith("ExecuteBatchError raised in core")
