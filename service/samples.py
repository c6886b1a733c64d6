"""Sample images for the demo page, made at run time from data the served version was
trained on or carries, so none are committed as files.

- A version whose model card says it was trained on Fashion-MNIST gets the first
  official test image of each of a few classes, read from the head of the IDX files in
  ``fashion_mnist_dir`` (the Debian package ``dataset-fashion-mnist``), with their true
  class.
- A version ``cnnserve train`` published from other data carries a few of its test
  split's images, one per class, with their class (``assets.extra/demo_samples/``,
  written at publish; ``--no-demo-samples`` leaves them out).
- Any other version gets the distinct images of its own warmup records
  (``assets.extra/tf_serving_warmup_requests``), leaving out uniform ones (the
  placeholder grey images ``cnnserve train`` writes tell a person nothing).

Either may find nothing (no dataset installed, no warmup file): the page then offers no
samples. Nothing here raises for missing or broken data; it is logged and skipped.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from service.repository import ASSETS_EXTRA, read_warmup, version_fingerprint
from service.training.data import FASHION_MNIST_CLASSES
from service.warmup import WarmupFormatError

log = logging.getLogger(__name__)

SAMPLE_COUNT = 6
FASHION_MNIST_ABOUT = "From the Fashion-MNIST test set (never seen in training)."
WARMUP_ABOUT = "From this version's warmup requests."
PUBLISHED_ABOUT = "From this version's test split (never seen in training)."
# In a version's assets.extra: the PNGs and an index of them (file, label, source).
SAMPLES_FOLDER = "demo_samples"
SAMPLES_INDEX = "samples.json"
# A published sample's PNG is read only up to this size (a folder anyone may edit).
MAX_SAMPLE_BYTES = 4 * 1024 * 1024
# Test images read to find SAMPLE_COUNT classes (the first 20 already hold all ten).
FASHION_MNIST_SCAN = 200
IDX_IMAGES, IDX_LABELS = 0x0803, 0x0801


@dataclass(frozen=True)
class Sample:
    label: str  # the true class, "" when unknown (warmup images)
    source: str  # which image it is, for a person
    about: str  # where the samples come from, for a person
    png: bytes


def trained_on_fashion_mnist(card: Mapping[str, Any]) -> bool:
    training, dataset = card.get("training"), card.get("dataset")
    return (isinstance(training, dict) and training.get("dataset") == "fashion_mnist") or (
        isinstance(dataset, dict) and dataset.get("source") == "fashion_mnist"
    )


def samples_for(
    version_dir: Path, card: Mapping[str, Any], fashion_mnist_dir: Path
) -> tuple[Sample, ...]:
    """The samples of one version (cached while its folder is unchanged)."""
    fashion = fashion_mnist_dir if trained_on_fashion_mnist(card) else None
    return _cached(version_dir, version_fingerprint(version_dir), fashion)


@functools.lru_cache(maxsize=16)
def _cached(
    version_dir: Path, fingerprint: tuple[int, ...], fashion_mnist_dir: Path | None
) -> tuple[Sample, ...]:
    if fashion_mnist_dir is not None:
        found = fashion_mnist_samples(fashion_mnist_dir)
        if found:
            return found
    return published_samples(version_dir) or warmup_samples(version_dir)


def write_samples(folder: Path, samples: list[tuple[npt.NDArray[np.uint8], str, str]]) -> None:
    """``(pixels, label, source)`` as ``folder``'s PNGs and their index, for
    :func:`published_samples` to read back."""
    folder.mkdir()
    index = []
    for number, (pixels, label, source) in enumerate(samples):
        name = f"{number}.png"
        (folder / name).write_bytes(png(pixels))
        index.append({"file": name, "label": label, "source": source})
    (folder / SAMPLES_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def published_samples(version_dir: Path, count: int = SAMPLE_COUNT) -> tuple[Sample, ...]:
    """The samples publishing wrote into the version (:func:`write_samples`); () when it
    has none, and when they cannot be read (logged)."""
    folder = version_dir / ASSETS_EXTRA / SAMPLES_FOLDER
    if not (folder / SAMPLES_INDEX).is_file():
        return ()
    found = []
    try:
        entries = json.loads((folder / SAMPLES_INDEX).read_text(encoding="utf-8"))
        for entry in entries[:count]:
            path = folder / Path(str(entry["file"])).name  # its own folder only
            with path.open("rb") as fh:
                data = fh.read(MAX_SAMPLE_BYTES + 1)
            if len(data) > MAX_SAMPLE_BYTES or not data.startswith(b"\x89PNG"):
                raise ValueError(f"{path} is not a PNG of at most {MAX_SAMPLE_BYTES} bytes")
            found.append(Sample(str(entry["label"]), str(entry["source"]), PUBLISHED_ABOUT, data))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("no published samples for the demo page from %s: %s", folder, exc)
        return ()
    return tuple(found)


def fashion_mnist_samples(directory: Path, count: int = SAMPLE_COUNT) -> tuple[Sample, ...]:
    """The first test image of each of the first ``count`` classes met in the test set."""
    try:
        images = _idx_head(directory, "t10k-images-idx3-ubyte", IDX_IMAGES, FASHION_MNIST_SCAN)
        labels = _idx_head(directory, "t10k-labels-idx1-ubyte", IDX_LABELS, FASHION_MNIST_SCAN)
    except (OSError, EOFError, ValueError) as exc:
        log.warning("no Fashion-MNIST samples for the demo page: %s", exc)
        return ()
    known = (y if 0 <= y < len(FASHION_MNIST_CLASSES) else None for y in labels.tolist())
    chosen = first_of_each_class(known, count)
    return tuple(
        Sample(
            FASHION_MNIST_CLASSES[label],
            f"Fashion-MNIST test image {index}",
            FASHION_MNIST_ABOUT,
            png(images[index]),
        )
        for label, index in chosen.items()
    )


def first_of_each_class(labels: Iterable[int | None], count: int) -> dict[int, int]:
    """Class → the index of its first image, for the first ``count`` classes met (None:
    an image of no class to show)."""
    chosen: dict[int, int] = {}
    for index, label in enumerate(labels):
        if label is not None:
            chosen.setdefault(label, index)
            if len(chosen) == count:
                break
    return chosen


def _idx_head(directory: Path, stem: str, magic: int, limit: int) -> npt.NDArray[np.uint8]:
    """The first ``limit`` items of an IDX file (gzipped or not), without reading the rest."""
    for path in (directory / f"{stem}.gz", directory / stem):
        if path.is_file():
            with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as fh:
                header = fh.read(4)
                if len(header) < 4 or int.from_bytes(header, "big") != magic:
                    raise ValueError(f"{path} is not an IDX file (magic {magic:#x} expected)")
                dims = [int.from_bytes(fh.read(4), "big") for _ in range(header[3])]
                items = min(limit, dims[0])
                shape = (items, *dims[1:])
                data = fh.read(int(np.prod(shape)))
            if len(data) != int(np.prod(shape)):
                raise ValueError(f"{path} is shorter than its header says")
            return np.frombuffer(data, np.uint8).reshape(shape)
    raise FileNotFoundError(f"{stem}(.gz) not in {directory}")


def warmup_samples(version_dir: Path, count: int = SAMPLE_COUNT) -> tuple[Sample, ...]:
    """Distinct, non-uniform RGB images of the version's serving_default warmup requests."""
    try:
        requests = read_warmup(version_dir)
    except WarmupFormatError as exc:
        log.warning("no warmup samples for the demo page: %s", exc)
        return ()
    found: list[Sample] = []
    seen: set[bytes] = set()
    for number, inputs in enumerate(requests):
        for tensor in inputs.values():
            if tensor.dtype != np.uint8 or tensor.ndim != 4 or tensor.shape[-1] != 3:
                continue
            for image in tensor:
                digest = hashlib.sha256(image.tobytes()).digest()
                if image.min() == image.max() or digest in seen:
                    continue
                seen.add(digest)
                found.append(Sample("", f"warmup request {number}", WARMUP_ABOUT, png(image)))
                if len(found) == count:
                    return tuple(found)
    return tuple(found)


def png(pixels: npt.NDArray[np.uint8]) -> bytes:
    """Greyscale HxW or RGB HxWx3 pixels as a PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L" if pixels.ndim == 2 else "RGB").save(buffer, "PNG")
    return buffer.getvalue()
