"""Background checks that run for as long as a worker does."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def every(period: float, check: Callable[[], Awaitable[object]], what: str) -> None:
    """Await ``check()`` every ``period`` seconds, for good (cancel to stop). A check
    that raises is logged with ``what`` and the next one still runs: a check must never
    end checking, since the next may find things fixed."""
    while True:
        await asyncio.sleep(period)
        try:
            await check()
        except Exception:
            log.exception("%s failed; trying again in %s s", what, period)
