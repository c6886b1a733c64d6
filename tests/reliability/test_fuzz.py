"""Property-based fuzzing (hypothesis) of image decoding and request parsing: whatever the
bytes, decoding returns a model input or raises one of our 4xx errors, and the server
answers every request below 500 with a JSON error body. CI runs a short budget; `make
fuzz` runs the `fuzz` profile (HYPOTHESIS_PROFILE=fuzz) with many more examples."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import CnnserveError
from service.preprocessing import PreprocessSpec, preprocess_bytes
from tests.helpers.images import encode, gradient
from tests.helpers.server import Server

SPEC = PreprocessSpec()
SEEDS = [encode(gradient(), fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")]
SERVER_CHECKS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
CONTENT_TYPES = [
    "image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "image/tiff",
    "application/octet-stream", "application/json", "multipart/form-data; boundary=b",
    "multipart/form-data", "text/plain", "", "image/svg+xml", "application/pdf",
]  # fmt: skip


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid image with bytes flipped, cut or spliced: the header survives, the rest lies."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    cut = draw(st.integers(1, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=64))


def assert_decodes_or_refuses(data: bytes) -> None:
    try:
        image = preprocess_bytes(data, SPEC, max_pixels=4_000_000)
    except CnnserveError as exc:
        assert exc.http_status in (400, 413), exc
        return
    assert image.shape == (224, 224, 3) and image.dtype == np.uint8


@settings(deadline=None)
@given(st.binary(max_size=4096))
def test_decoding_arbitrary_bytes(data: bytes) -> None:
    assert_decodes_or_refuses(data)


@settings(deadline=None)
@given(mutated_images())
def test_decoding_mutated_images(data: bytes) -> None:
    assert_decodes_or_refuses(data)


def assert_clean(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:300]
    if response.status_code >= 400:
        assert set(response.json()) == {"error"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(deadline=None, suppress_health_check=SERVER_CHECKS)
@given(
    body=st.one_of(st.binary(max_size=2048), mutated_images()),
    content_type=st.sampled_from(CONTENT_TYPES),
)
def test_classify_any_body(server: Server, body: bytes, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    assert_clean(httpx.post(f"{server.url}/v1/classify", content=body, headers=headers, timeout=30))


@settings(deadline=None, suppress_health_check=SERVER_CHECKS)
@given(
    value=json_values,
    key=st.sampled_from(["image", "images", "instances", "inputs", "signature_name", "x"]),
    path=st.sampled_from(["/v1/classify", "/v1/models/tiny:predict"]),
)
def test_any_json(server: Server, value: object, key: str, path: str) -> None:
    body = json.dumps({key: value})
    headers = {"content-type": "application/json"}
    assert_clean(httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=30))


@settings(deadline=None, suppress_health_check=SERVER_CHECKS)
@given(
    params=st.dictionaries(
        st.sampled_from(["top_k", "model", "version", "label"]), st.text(max_size=30), max_size=4
    )
)
def test_any_query(server: Server, params: dict[str, str]) -> None:
    response = httpx.post(
        f"{server.url}/v1/classify",
        params=params,
        content=SEEDS[0],
        headers={"content-type": "image/png"},
        timeout=30,
    )
    assert_clean(response)


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_seed_images_decode(seed: int) -> None:
    assert preprocess_bytes(SEEDS[seed], SPEC, max_pixels=4_000_000).shape == (224, 224, 3)
