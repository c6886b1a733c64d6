"""The fast paths for raw-body POST /v1/classify answer exactly as the FastAPI route does:
the HTTP protocol's direct path (service.api.direct_classify, on by default) and the
ASGI fast path (service.api.fastpath, what answers with the direct path off, and
pipelined requests).

A repeated query parameter sends the same request to the route (both fast paths leave
repeated parameters to the route's validation), so each case is asked both ways of one
real server and the answers compared byte for byte."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.api.fastpath import ClassifyFastPath
from tests.helpers.images import encode, gradient
from tests.helpers.server import Server, running_server

pytestmark = pytest.mark.slow

PNG = encode(gradient(), "PNG")
JPEG = encode(gradient(90, 70), "JPEG")


@pytest.fixture(scope="module", params=["direct", "asgi"])
def server(tiny_repo_litert: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    env = {
        "CNNSERVE_MAX_BODY_BYTES": "100000",
        "CNNSERVE_DIRECT_CLASSIFY": str(request.param == "direct").lower(),
    }
    with running_server(tiny_repo_litert, env=env, args=("--poll-seconds", "0")) as srv:
        yield srv


CASES: list[tuple[str, str, bytes, dict[str, str]]] = [
    # id, content type, body, query
    ("png", "image/png", PNG, {}),
    ("jpeg-top1", "image/jpeg", JPEG, {"top_k": "1"}),
    ("octet-stream", "application/octet-stream", PNG, {"version": "1"}),
    ("content-type-params", "image/png; charset=binary", PNG, {"model": "tiny"}),
    ("label-unknown", "image/png", PNG, {"label": "nope"}),
    ("version-missing", "image/png", PNG, {"version": "7"}),
    ("model-unknown", "image/png", PNG, {"model": "nope"}),
    ("top-k-zero", "image/png", PNG, {"top_k": "0"}),
    ("top-k-too-big", "image/png", PNG, {"top_k": "99"}),
    ("version-and-label", "image/png", PNG, {"version": "1", "label": "stable"}),
    ("empty-body", "image/png", b"", {}),
    ("not-an-image", "image/jpeg", b"GIF89a but not really", {}),
    ("too-large", "image/png", b"\0" * 200_000, {}),
]


@pytest.mark.parametrize(
    ("content_type", "body", "query"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_fast_path_answers_as_the_route(
    server: Server, content_type: str, body: bytes, query: dict[str, str]
) -> None:
    fast_query = "&".join(f"{k}={v}" for k, v in query.items())
    repeated = next(iter(query), "model")
    value = query.get(repeated, "tiny")
    route_query = "&".join(filter(None, [fast_query, f"{repeated}={value}"]))
    if repeated not in query:  # the default model, named twice
        route_query = f"model={value}&{route_query}"
    headers = {"content-type": content_type}
    with server.client() as client:
        fast = client.post(f"/v1/classify?{fast_query}", content=body, headers=headers)
        route = client.post(f"/v1/classify?{route_query}", content=body, headers=headers)
    assert fast.status_code == route.status_code, (fast.text, route.text)
    assert fast.content == route.content
    assert fast.headers["content-type"] == route.headers["content-type"]
    assert fast.headers.get("retry-after") == route.headers.get("retry-after")
    assert (
        fast.headers["x-request-id"]
        and fast.headers["x-request-id"] != route.headers["x-request-id"]
    )
    if fast.status_code == 200:
        assert "decode;dur=" in fast.headers["server-timing"]


def test_fast_path_requests_are_counted_under_the_route(server: Server) -> None:
    with server.client() as client:
        client.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
        text = client.get("/metrics").text
    assert 'route="/v1/classify"' in text
    assert not [line for line in text.splitlines() if "unmatched" in line], text


async def _app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("not called")


@pytest.mark.parametrize(
    ("method", "path", "content_type", "query", "taken"),
    [
        ("POST", "/v1/classify", b"image/jpeg", b"", True),
        ("POST", "/v1/classify", b"IMAGE/PNG; x=y", b"top_k=2&model=a", True),
        # An unknown parameter is the route's to refuse (a typo was ignored before).
        ("POST", "/v1/classify", b"image/png", b"top_k=2&other=1", False),
        ("POST", "/v1/classify", b"multipart/form-data; boundary=x", b"", False),
        ("POST", "/v1/classify", b"application/json", b"", False),
        ("POST", "/v1/classify", b"", b"", False),
        ("POST", "/v1/classify", b"image/jpeg", b"top_k=abc", False),
        ("POST", "/v1/classify", b"image/jpeg", b"top_k=-1", False),
        ("POST", "/v1/classify", b"image/jpeg", b"version=1&version=2", False),
        ("GET", "/v1/classify", b"image/jpeg", b"", False),
        ("POST", "/v1/models/x:predict", b"image/jpeg", b"", False),
    ],
)
def test_which_requests_take_the_fast_path(
    method: str, path: str, content_type: bytes, query: bytes, taken: bool
) -> None:
    headers = [(b"content-type", content_type)] if content_type else []
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    scope["query_string"] = query
    assert (ClassifyFastPath(_app)._taken(scope) is not None) is taken
