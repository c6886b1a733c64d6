"""Small images made on the fly, in every format the gateway accepts."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


# TIFF field types of single-valued entries, and the tags that point at the image data.
SHORT, LONG = 3, 4
DATA_OFFSET_TAGS = {273, 324}  # StripOffsets, TileOffsets


def tiff(entries: list[tuple[int, int, int]], data: bytes = b"") -> bytes:
    """A little-endian TIFF of one IFD, then ``data``: each entry a (tag, SHORT or LONG,
    value) of one value; StripOffsets and TileOffsets point at the data whatever their
    value. What tests need that Pillow will not write (other sample types, tiles, headers
    that lie)."""
    offset = 8 + 2 + 12 * len(entries) + 4
    ifd = b"".join(
        struct.pack("<HHI", tag, kind, 1)
        + struct.pack(
            "<I" if kind == LONG else "<H2x", offset if tag in DATA_OFFSET_TAGS else value
        )
        for tag, kind, value in entries
    )
    return b"II*\x00" + struct.pack("<IH", 8, len(entries)) + ifd + struct.pack("<I", 0) + data


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


def renamed_class_folders(root: Path, names: list[str], per_class: int) -> Path:
    """write_class_folders' dataset under other class names (a source to map)."""
    write_class_folders(root, classes=len(names), per_class=per_class)
    for i, name in enumerate(names):
        (root / f"class_{i}").rename(root / name)
    return root


def write_noisy_class_folders(
    root: Path,
    *,
    split_of: Callable[[bytes], str],
    classes: int = 4,
    per_class: int = 50,
    noise: float = 0.05,
    cross_split_duplicates: int = 3,
    size: int = 24,
) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """Class folders (colour tells the class) with planted faults: ``noise`` of the images
    saved in a wrong class's folder, and near-duplicate copies (a few pixels changed) that
    ``split_of`` (file bytes → split name) puts in another split than their original.
    Returns the mislabelled files and the (original, copy) pairs."""
    rng = np.random.default_rng(1)
    palette = [(210, 40, 40), (40, 210, 40), (40, 40, 210), (210, 210, 40), (210, 40, 210)]
    names = [f"class_{c}" for c in range(classes)]
    for name in names:
        (root / name).mkdir(parents=True)
    flipped = set(rng.choice(classes * per_class, round(noise * classes * per_class), False))
    mislabelled: list[Path] = []
    originals: list[tuple[Path, np.ndarray]] = []
    for n in range(classes * per_class):
        c = n % classes
        pixels = np.clip(
            np.array(palette[c], np.int16) + rng.integers(-35, 35, (size, size, 3)), 0, 255
        ).astype(np.uint8)
        x, y = rng.integers(0, size - 6, 2)
        pixels[y : y + 6, x : x + 6] = 255  # a bright patch somewhere: images differ in shape
        folder = names[(c + 1 + int(rng.integers(classes - 1))) % classes if n in flipped else c]
        path = root / folder / f"{n:04d}.png"
        Image.fromarray(pixels).save(path)
        if n in flipped:
            mislabelled.append(path)
        else:
            originals.append((path, pixels))
    pairs: list[tuple[Path, Path]] = []
    for path, pixels in originals:
        if len(pairs) == cross_split_duplicates:
            break
        for delta in range(1, 40):
            copy = pixels.copy()
            copy[0, 0] = (copy[0, 0].astype(np.int16) + delta).clip(0, 255).astype(np.uint8)
            data = encode(Image.fromarray(copy), "PNG")
            if split_of(data) != split_of(path.read_bytes()):
                target = path.with_name(f"{path.stem}-copy.png")
                target.write_bytes(data)
                pairs.append((path, target))
                break
    return mislabelled, pairs


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
