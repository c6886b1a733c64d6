"""Helpers for tests that drive the core (registry, batcher) in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.config import Settings
from service.registry import Registry

IMAGES = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)


def settings(repo: Path, tmp_path: Path) -> Settings:
    # request_timeout_seconds also bounds how long an unload waits for requests that
    # still hold a version; it is long so that a leaked reference shows as a warning.
    return Settings(
        model_repository=repo,
        runtime="tensorflow",
        poll_seconds=0,
        cache_dir=tmp_path / "cache",
        intra_op_threads=1,
        request_timeout_seconds=30,
    )


def run_with(registry: Registry, scenario: Callable[[], Awaitable[None]]) -> None:
    """Run a scenario on a fresh event loop, always stopping the registry after it."""

    async def main() -> None:
        try:
            await scenario()
        finally:
            await registry.stop()

    asyncio.run(main())


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop (no timed sleep) until ``condition`` holds."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


Array = npt.NDArray[Any]


def whole(
    predict: Callable[[Array, float | None], Array],
) -> Callable[[list[Array], float | None], Array]:
    """A batcher's predict made from one on a whole batch: the requests' parts
    concatenated first, as Runtime.predict_parts does by default."""
    return lambda parts, deadline: predict(np.concatenate(parts), deadline)
