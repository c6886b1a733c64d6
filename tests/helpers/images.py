"""Small images made on the fly, in every format the gateway accepts."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    """An RGB image whose corners differ, so flips and rotations are visible."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack(
        [
            np.broadcast_to(x, (height, width)),
            np.broadcast_to(y, (height, width)),
            np.full((height, width), 64, np.float32),
        ],
        axis=2,
    )
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def write_class_folders(root: Path, classes: int = 3, per_class: int = 12, size: int = 32) -> Path:
    """A folder dataset whose classes are tellable apart (distinct mean colours)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), np.uint8)
            base[..., c % 3] = 200
            noise = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
            img = Image.fromarray(base + noise, "RGB")
            img.save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root
