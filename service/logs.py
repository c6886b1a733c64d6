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
