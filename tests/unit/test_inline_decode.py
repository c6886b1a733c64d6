"""Where the data plane decodes: a lone small image on the event loop, the rest on the
decode threads; the pixels are the same either way."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.config import Settings
from service.dataplane import DataPlane
from service.preprocessing import PreprocessSpec, preprocess_bytes
from tests.helpers.images import encode, gradient


class CountingPool(ThreadPoolExecutor):
    """A real thread pool that counts what it is given."""

    def __init__(self) -> None:
        super().__init__(2)
        self.submitted = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def decode(images: list[bytes], **settings: Any) -> tuple[np.ndarray, int]:
    pool = CountingPool()
    plane = DataPlane(Settings(**settings), None, pool)  # type: ignore[arg-type]
    target = SimpleNamespace(
        model="m", spec=PreprocessSpec(), batcher=SimpleNamespace(admit=lambda n, d: None)
    )
    try:
        batch = asyncio.run(plane.decode(images, target, time.monotonic() + 30))  # type: ignore[arg-type]
    finally:
        pool.shutdown()
    return batch, pool.submitted


def expected(images: list[bytes]) -> np.ndarray:
    return np.stack([preprocess_bytes(b, PreprocessSpec(), max_pixels=10**8) for b in images])


def solid(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (200, 30, 90))


@pytest.mark.parametrize(
    ("image", "fmt", "threads"),
    [
        (gradient(224, 224), "JPEG", 0),  # the common upload: decoded where it arrived
        (gradient(60, 40), "PNG", 0),
        # 1600x1200 JPEG decodes at a quarter scale (400x300 = 120,000 pixels): inline
        (gradient(1600, 1200), "JPEG", 0),
        # a tiny file that unpacks into 4,000,000 pixels: to a decode thread
        (solid(2000, 2000), "PNG", 1),
    ],
    ids=["jpeg-224", "png-small", "jpeg-reduced-scale", "png-large-small-file"],
)
def test_lone_images_are_decoded_inline_unless_large(
    image: Image.Image, fmt: str, threads: int
) -> None:
    data = encode(image, fmt)
    batch, submitted = decode([data])
    assert submitted == threads
    np.testing.assert_array_equal(batch, expected([data]))


def test_lists_and_a_zero_threshold_use_the_decode_threads() -> None:
    a, b = encode(gradient(50, 50), "PNG"), encode(gradient(70, 30), "JPEG")
    batch, submitted = decode([a, b])
    assert submitted == 2
    np.testing.assert_array_equal(batch, expected([a, b]))
    batch, submitted = decode([a], inline_decode_max_pixels=0)
    assert submitted == 1
    np.testing.assert_array_equal(batch, expected([a]))


def test_json_pixel_lists_become_arrays_off_the_event_loop() -> None:
    """A 10 MB predict body of pixel lists takes ~0.2 s to convert: not on the loop,
    where every other request of the worker would wait for it; arrays (gRPC's) stay."""
    from service.dataplane import _off_loop_if_lists

    def where(value: Any) -> int:
        return threading.get_ident()

    async def scenario() -> tuple[int, int, int]:
        loop_thread = threading.get_ident()
        as_list = await _off_loop_if_lists(where, [[1, 2]])
        as_array = await _off_loop_if_lists(where, np.zeros((1, 2)))
        return loop_thread, as_list, as_array

    loop_thread, as_list, as_array = asyncio.run(scenario())
    assert as_list != loop_thread and as_array == loop_thread
