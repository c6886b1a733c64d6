"""Natural-looking test pictures, made at run time from a seed (no image files in git).

:func:`photo` draws one: a smooth colour field, a few soft shapes, sensor grain; the
locust payloads (``loadtests/payloads.py``) use it too. :func:`photo_mix` is the
bench's ``--payload photos``: 200 such 224×224 pictures as JPEGs, at the one quality
that puts the median file size closest to 10 KiB (what a phone's thumbnail or a
product image weighs), so every request of a run can carry a different body.
"""

from __future__ import annotations

import io
import statistics
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PHOTO_COUNT = 200
TARGET_BYTES = 10 * 1024
SIDE = 224
# Milder than a phone sensor's grain: noise costs JPEG bytes, and the mix is meant to
# weigh ~10 KiB at a quality a photo would still be sent at.
MIX_GRAIN = 2.0
QUALITIES = range(20, 96)


def photo(width: int, height: int, rng: np.random.Generator, grain: float = 6.0) -> Image.Image:
    """A photo-like picture: a smooth colour field, a few soft shapes, sensor grain."""
    colours = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(colours, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(min(width, height) // 12, min(width, height) // 3))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(2))
    noise = rng.normal(0, grain, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8), "RGB")


def jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class PhotoMix:
    """The encoded pictures and the JPEG quality they were saved at."""

    images: list[bytes] = field(repr=False)
    quality: int

    @property
    def median_bytes(self) -> int:
        return int(statistics.median(len(x) for x in self.images))

    def describe(self) -> str:
        return (
            f"{len(self.images)} photo-like {SIDE}x{SIDE} JPEGs (quality {self.quality}, "
            f"median {self.median_bytes} bytes), a random one per request, raw body (image/jpeg)"
        )


def photo_mix(
    count: int = PHOTO_COUNT, *, seed: int = 0, target_bytes: int = TARGET_BYTES
) -> PhotoMix:
    """``count`` seeded pictures at the quality whose median size is nearest the target
    (the same bytes for the same arguments)."""
    rng = np.random.default_rng(seed)
    pictures = [photo(SIDE, SIDE, rng, grain=MIX_GRAIN) for _ in range(count)]

    def median_at(quality: int) -> float:
        return statistics.median(len(jpeg(p, quality)) for p in pictures)

    # The median grows with quality: bisect for the last quality at or under the target,
    # then take it or the next one, whichever lands nearer.
    lo, hi = 0, len(QUALITIES) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if median_at(QUALITIES[mid]) <= target_bytes:
            lo = mid
        else:
            hi = mid - 1
    best = QUALITIES[lo]
    if lo + 1 < len(QUALITIES):
        above = QUALITIES[lo + 1]
        if abs(median_at(above) - target_bytes) < abs(median_at(best) - target_bytes):
            best = above
    return PhotoMix([jpeg(p, best) for p in pictures], best)
