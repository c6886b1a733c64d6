"""The images the locust users send, made at start with fixed seeds (no blobs in git).

- Fashion-MNIST test images (Debian's dataset-fashion-mnist), re-encoded at 28×28 and
  224×224, each as PNG and as JPEG: what the model was trained on;
- photo-like JPEGs (smooth colour fields with grain and edges, drawn by
  :func:`service.bench.photos.photo`, as `cnnserve bench --payload photos` sends) at
  224×224 and 1280×720: what a phone or a product page sends, where decoding and
  resizing cost the most.

Weights for the image kinds and the request encodings are strings such as
``"raw:6,multipart:2,json:2"``. Encodings: the raw body, multipart and base64 JSON of
``/v1/classify``, and ``tfserving``: TF Serving's REST ``:predict`` with the file as
``{"b64": …}`` on the ``predict_image_bytes`` signature (what TF Serving clients send).
"""

from __future__ import annotations

import io
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from service.bench.photos import photo

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_KINDS = ("fmnist28", "fmnist224", "photo224", "photo720p")
ENCODINGS = ("raw", "multipart", "json", "tfserving")
DEFAULT_IMAGE_MIX = "fmnist28:3,fmnist224:3,photo224:3,photo720p:1"
DEFAULT_ENCODING_MIX = "raw:6,multipart:2,json:2"


@dataclass(frozen=True)
class Payload:
    kind: str
    content_type: str  # image/png or image/jpeg
    data: bytes


def parse_mix(text: str, allowed: tuple[str, ...]) -> dict[str, float]:
    """``"a:3,b:1"`` → {"a": 3.0, "b": 1.0}; names outside ``allowed`` are refused."""
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition(":")
        if name not in allowed:
            raise ValueError(f"unknown {name!r} in {text!r}; use {', '.join(allowed)}")
        mix[name] = float(weight or 1)
    if not mix or sum(mix.values()) <= 0:
        raise ValueError(f"{text!r} gives no positive weight")
    return mix


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def fashion_mnist(count: int, directory: Path = FASHION_MNIST_DIR) -> list[Image.Image]:
    """The first ``count`` official test images; empty when the dataset is missing."""
    path = directory / "t10k-images-idx3-ubyte.gz"
    if not path.exists():
        return []
    from service.training.data import load_fashion_mnist

    _, test = load_fashion_mnist(directory)
    assert test.pixels is not None
    return [Image.fromarray(p) for p in test.pixels[:count]]


def build(
    fashion_count: int = 32, photos: int = 6, directory: Path = FASHION_MNIST_DIR
) -> dict[str, list[Payload]]:
    """Every payload by kind; deterministic for a given dataset."""
    pool: dict[str, list[Payload]] = {kind: [] for kind in IMAGE_KINDS}
    rng = np.random.default_rng(0)
    images = fashion_mnist(fashion_count, directory)
    if not images:  # no dataset: greyscale stand-ins keep the 28×28 sizes in the mix
        warnings.warn(
            f"no Fashion-MNIST test images in {directory} (Debian's dataset-fashion-mnist, "
            "or --fashion-mnist-dir): the fmnist kinds send greyscale stand-ins",
            stacklevel=2,
        )
        images = [photo(28, 28, rng).convert("L") for _ in range(8)]
    for img in images:
        for fmt, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
            pool["fmnist28"].append(Payload("fmnist28", mime, _encode(img, fmt)))
            big = img.resize((224, 224), Image.Resampling.BILINEAR)
            pool["fmnist224"].append(Payload("fmnist224", mime, _encode(big, fmt)))
    for _ in range(photos):
        pool["photo224"].append(
            Payload("photo224", "image/jpeg", _encode(photo(224, 224, rng), "JPEG"))
        )
    for _ in range(max(1, photos // 2)):
        pool["photo720p"].append(
            Payload("photo720p", "image/jpeg", _encode(photo(1280, 720, rng), "JPEG"))
        )
    return pool


class Picker:
    """Draws (payload, encoding) pairs in the configured proportions."""

    def __init__(
        self, pool: dict[str, list[Payload]], image_mix: str, encoding_mix: str, seed: int = 0
    ) -> None:
        self.pool = pool
        kinds = parse_mix(image_mix, IMAGE_KINDS)
        self.kinds, self.kind_weights = list(kinds), list(kinds.values())
        encodings = parse_mix(encoding_mix, ENCODINGS)
        self.encodings, self.encoding_weights = list(encodings), list(encodings.values())
        self.random = random.Random(seed)

    def image(self) -> Payload:
        kind = self.random.choices(self.kinds, self.kind_weights)[0]
        return self.random.choice(self.pool[kind])

    def encoding(self) -> str:
        return self.random.choices(self.encodings, self.encoding_weights)[0]
