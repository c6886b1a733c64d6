"""Where the data plane decodes: a lone small image on the event loop, the rest on the
decode threads; the pixels are the same either way."""

from __future__ import annotations

import asyncio
import struct
import threading
import time
import zlib
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
    target = SimpleNamespace(model="m", spec=PreprocessSpec())
    held = SimpleNamespace(admit=lambda n, d: None)  # the batcher admits all
    try:
        batch = asyncio.run(plane.decode(images, target, time.monotonic() + 30, held))  # type: ignore[arg-type]
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
        # from a small file (40 KiB)
        (gradient(1600, 1200), "JPEG", 0),
        # a tiny file that unpacks into 4,000,000 pixels: to a decode thread
        (solid(2000, 2000), "PNG", 1),
        # 307,200 pixels, 3-5 ms: held the loop while calls waited unseen in gRPC's core
        (gradient(640, 480), "PNG", 1),
    ],
    ids=["jpeg-224", "png-small", "jpeg-reduced-scale", "png-large-small-file", "png-640x480"],
)
def test_lone_images_are_decoded_inline_unless_large(
    image: Image.Image, fmt: str, threads: int
) -> None:
    data = encode(image, fmt)
    batch, submitted = decode([data])
    assert submitted == threads
    np.testing.assert_array_equal(batch, expected([data]))


def scan_bomb(size: int, repeats: int) -> bytes:
    """The reviewer's progressive JPEG whose last scan is repeated (5600², 300 repeats:
    decoded to 700x700 at 1/8 scale, yet 20 s on the event loop)."""
    data = encode(Image.new("L", (size, size), 128), "JPEG", progressive=True, quality=10)
    dht, eoi = data.rfind(b"\xff\xc4"), data.rfind(b"\xff\xd9")
    return data[:eoi] + data[dht:eoi] * repeats + b"\xff\xd9"


def photo_jpeg(width: int, height: int) -> bytes:
    """A JPEG as large as a photo of that size (noise over a gradient), not a smooth
    gradient's few KiB."""
    noise = np.random.default_rng(0).integers(0, 60, (height, width, 3))
    pixels = np.asarray(gradient(width, height), np.int64) * 3 // 4 + noise
    return encode(Image.fromarray(pixels.astype(np.uint8)), "JPEG", quality=85)


def padded_png(image: Image.Image, extra: int) -> bytes:
    """``image`` as a PNG with one ancillary chunk of ``extra`` bytes after its data."""
    png = encode(image, "PNG")
    iend = png.index(b"IEND") - 4
    body = b"abCd" + b"\x00" * extra
    chunk = struct.pack(">I", extra) + body + struct.pack(">I", zlib.crc32(body))
    return png[:iend] + chunk + png[iend:]


@pytest.mark.parametrize(
    ("data", "threads"),
    [
        # 1792x1792 decoded at 1/8 (224x224 = 50,176 pixels), each of its scans a pass
        # over 3,211,264: to a decode thread, where a baseline one (60 KiB) stays inline
        (encode(gradient(1792, 1792), "JPEG", progressive=True), 1),
        (encode(gradient(1792, 1792), "JPEG"), 0),
        (scan_bomb(2000, 40), 1),  # 40 repeats: under the scan limit, still costly
        (encode(gradient(224, 224), "JPEG", progressive=True), 0),  # a small one is cheap
        # 16 pixels in a 300 KB file: Pillow reads what follows the pixels as it decodes
        (padded_png(gradient(4, 4), 300_000), 1),
        (padded_png(gradient(4, 4), 50_000), 0),
        # a JPEG reads all its data whatever its reduced scale: 1024x768 photo-like in
        # ~250 KiB, 512x384 pixels, ~4 ms (inline at 256 KiB before)
        (photo_jpeg(1024, 768), 1),
        (photo_jpeg(224, 224), 0),  # ~17 KiB
    ],
    ids=[
        "progressive",
        "baseline",
        "scan-bomb",
        "progressive-224",
        "big-file",
        "padded-file",
        "photo-1024x768",
        "photo-224",
    ],
)
def test_costly_files_of_few_pixels_use_the_decode_threads(data: bytes, threads: int) -> None:
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


def test_json_pixel_lists_and_large_arrays_are_read_off_the_event_loop() -> None:
    """A 10 MB predict body of pixel lists takes ~0.1 s to convert, and the checks of 12
    images of floats (finite, in range, whole) ~10 ms: not on the loop, where every
    other request of the worker would wait for them. uint8 arrays, and small ones, stay:
    nothing to do, or less than a thread's hop."""
    from service.dataplane import LARGE_ARRAY_VALUES, _off_loop_if_large

    def where(value: Any) -> int:
        return threading.get_ident()

    async def scenario() -> list[bool]:
        loop_thread = threading.get_ident()
        values = [
            [[1, 2]],
            np.zeros(LARGE_ARRAY_VALUES, np.float32),
            np.zeros(LARGE_ARRAY_VALUES, np.uint8),
            np.zeros((1, 2)),
        ]
        return [await _off_loop_if_large(where, value) != loop_thread for value in values]

    assert asyncio.run(scenario()) == [True, True, False, False]
