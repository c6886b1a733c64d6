"""What a request weighs in the worker's concurrency limit: the images it carries, as its
route learns them (service.requestlog.note_images), reach ConcurrencyLimit.release, whose
floor is counted in images (service.concurrency). The real app and uvicorn run in this
process, so the releases can be watched."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.concurrency import ConcurrencyLimit
from service.config import Settings
from tests.helpers.images import encode, gradient
from tests.helpers.in_process import serving_in_process
from tests.helpers.server import eventually

pytestmark = pytest.mark.slow

PNG = encode(gradient(), "PNG")
MOST = 4  # max_images_per_request


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[httpx.Client, list[int]]]:
    released: list[int] = []
    release = ConcurrencyLimit.release

    def watched(self: ConcurrencyLimit, taken: float, images: int = 1) -> None:
        released.append(images)
        release(self, taken, images)

    settings = Settings(
        model_repository=Path(__file__).resolve().parents[2] / "model_repository",
        grpc_port=0,
        poll_seconds=0,
        max_images_per_request=MOST,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ConcurrencyLimit, "release", watched)
        with (
            serving_in_process(settings) as port,
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
        ):
            yield client, released


def weight_of(
    served: tuple[httpx.Client, list[int]], path: str, **kwargs: object
) -> tuple[int, int]:
    """One POST to ``path``: its status, and the images its place was released with.
    The place may be released just after the answer is sent (the raw-image path frees
    it once its write returns): waited for, not read at once (a fresh-clone CI run read
    it a moment early)."""
    client, released = served
    before = len(released)
    response = client.post(path, **kwargs)  # type: ignore[arg-type]
    eventually(lambda: len(released) > before, timeout=10)
    assert len(released) == before + 1, response.text
    return response.status_code, released[-1]


def test_a_request_weighs_the_images_it_carries(served: tuple[httpx.Client, list[int]]) -> None:
    three = [("image", (f"{i}.png", PNG, "image/png")) for i in range(3)]
    assert weight_of(served, "/v1/classify", files=three) == (200, 3)
    instances = {"instances": [{"b64": base64.b64encode(PNG).decode()}] * 2}
    predict = "/v1/models/fashion_mnist:predict"
    assert weight_of(served, predict, content=json.dumps(instances)) == (200, 2)
    raw = {"content": PNG, "headers": {"content-type": "image/png"}}
    assert weight_of(served, "/v1/classify", **raw) == (200, 1)


def test_a_request_over_the_image_limit_weighs_one(
    served: tuple[httpx.Client, list[int]],
) -> None:
    """Refused for its count, it is not weighed by what it claimed: a client could
    otherwise talk the limit's floor down."""
    many = [("image", (f"{i}.png", PNG, "image/png")) for i in range(MOST + 1)]
    status, images = weight_of(served, "/v1/classify", files=many)
    assert status in (400, 413) and images == 1
