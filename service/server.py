"""`cnnserve serve`: run the gateway with uvicorn, one model copy per worker process."""

from __future__ import annotations

import logging
import os

import uvicorn

from service.config import Settings

log = logging.getLogger(__name__)


def _settings_env(settings: Settings) -> dict[str, str]:
    """Settings as CNNSERVE_* variables, so worker processes rebuild the same object."""
    return {
        f"CNNSERVE_{name.upper()}": str(value)
        for name, value in settings.model_dump().items()
        if value is not None
    }


def serve(settings: Settings) -> int:
    cores = os.cpu_count() or 1
    if not settings.intra_op_threads:
        # Workers split the cores; each inference uses its share, not all of them.
        settings = settings.model_copy(
            update={"intra_op_threads": max(1, cores // settings.workers)}
        )
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": "info",
        "timeout_graceful_shutdown": 10,
    }
    if settings.workers == 1:
        from service.api.app import create_app

        uvicorn.run(create_app(settings), **common)  # type: ignore[arg-type]
    else:
        os.environ.update(_settings_env(settings))
        uvicorn.run(
            "service.api.app:create_app",
            factory=True,
            workers=settings.workers,
            **common,  # type: ignore[arg-type]
        )
    return 0
