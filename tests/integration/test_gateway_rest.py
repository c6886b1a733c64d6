"""The REST API of a real `cnnserve serve` process, on a small generated model."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from service.preprocessing import PreprocessSpec, preprocess_bytes
from tests.helpers.images import encode, gradient
from tests.helpers.server import Server, running_server

pytestmark = pytest.mark.slow

LIMITS = {
    "CNNSERVE_MAX_BODY_BYTES": "2000000",
    "CNNSERVE_MAX_IMAGE_PIXELS": "1500000",
    "CNNSERVE_MAX_IMAGES_PER_REQUEST": "4",
}


@pytest.fixture(scope="module")
def repository(tiny_repo_litert: Path) -> Path:
    return tiny_repo_litert


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[Server]:
    with running_server(repository, env=LIMITS, args=("--poll-seconds", "0")) as srv:
        yield srv


def offline(repository: Path, images: list[bytes]) -> np.ndarray:
    """What the SavedModel itself says about the gateway's own preprocessing."""
    pixels = np.stack([preprocess_bytes(b, PreprocessSpec(), max_pixels=10**8) for b in images])
    sig = tf.saved_model.load(str(repository / "tiny" / "1")).signatures["serving_default"]
    return np.asarray(sig(image=tf.constant(pixels))["probabilities"].numpy())


def test_classify_raw_body_matches_the_saved_model(server: Server, repository: Path) -> None:
    png = encode(gradient(), "PNG")
    with server.client() as client:
        r = client.post(
            "/v1/classify",
            content=png,
            headers={"content-type": "image/png", "x-request-id": "abc123"},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["version"] == 1
    preds = body["predictions"]
    assert [p["label"] for p in preds] and len(preds) == 3
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True)
    expected = offline(repository, [png])[0]
    for p in preds:
        assert p["label"] == ["cat", "dog", "bird"][p["class_id"]]
        assert p["score"] == pytest.approx(float(expected[p["class_id"]]), abs=1e-4)
    assert r.headers["x-request-id"] == "abc123"
    assert "decode;dur=" in r.headers["server-timing"]


def test_several_encodings_and_forms(server: Server, repository: Path) -> None:
    img = gradient(80, 60)
    jpeg, webp, bmp = encode(img, "JPEG"), encode(img, "WEBP"), encode(img, "BMP")
    with server.client() as client:
        multi = client.post(
            "/v1/classify",
            params={"top_k": 2},
            files=[
                ("image", ("a.jpg", jpeg, "image/jpeg")),
                ("image", ("b.webp", webp, "image/webp")),
            ],
        )
        single = client.post("/v1/classify", files={"image": ("c.bmp", bmp, "image/bmp")})
        as_json = client.post("/v1/classify", json={"images": [base64.b64encode(jpeg).decode()]})
        one_json = client.post("/v1/classify", json={"image": base64.b64encode(bmp).decode()})
    assert multi.status_code == 200, multi.text
    results = multi.json()["results"]
    assert len(results) == 2 and all(len(r["predictions"]) == 2 for r in results)
    expected = offline(repository, [jpeg, webp])
    for row, probs in zip(results, expected, strict=True):
        assert row["predictions"][0]["class_id"] == int(np.argmax(probs))
    assert single.status_code == 200 and "predictions" in single.json()
    assert as_json.status_code == 200 and len(as_json.json()["results"]) == 1
    assert one_json.json()["predictions"] == single.json()["predictions"]


def _error(response: object, status: int, code: str) -> str:
    r = response
    assert r.status_code == status, r.text  # type: ignore[attr-defined]
    body = r.json()  # type: ignore[attr-defined]
    assert body["error"]["code"] == code, body
    message: str = body["error"]["message"]
    assert message
    return message


def test_error_paths(server: Server) -> None:
    png = encode(gradient(), "PNG")
    with server.client() as client:
        post = client.post
        msg = _error(
            post("/v1/classify", content=b"not an image", headers={"content-type": "image/png"}),
            400,
            "invalid_image",
        )
        assert "PNG" in msg
        svg = post(
            "/v1/classify",
            content=b"<svg/>",
            headers={"content-type": "image/svg+xml", "x-request-id": "err-1"},
        )
        msg = _error(svg, 415, "unsupported_media_type")
        assert svg.headers.get_list("x-request-id") == ["err-1"]
        assert "image/svg+xml" in msg and "JPEG" in msg
        _error(
            post("/v1/classify", content=png, headers={"content-type": "text/plain"}),
            415,
            "unsupported_media_type",
        )
        big = np.random.default_rng(0).integers(0, 256, (900, 900, 3), np.uint8)
        body = encode(Image.fromarray(big), "PNG")
        assert len(body) > 2_000_000
        too_big = post("/v1/classify", content=body, headers={"content-type": "image/png"})
        _error(too_big, 413, "payload_too_large")
        # Refused from Content-Length before the app runs, and still tagged once.
        assert len(too_big.headers.get_list("x-request-id")) == 1
        chunked = post(
            "/v1/classify",
            content=iter([body[:1_000_000], body[1_000_000:]]),
            headers={"content-type": "image/png"},
        )
        _error(chunked, 413, "payload_too_large")
        huge = encode(Image.new("L", (2000, 2000)), "PNG")
        _error(
            post("/v1/classify", content=huge, headers={"content-type": "image/png"}),
            413,
            "image_too_large",
        )
        five = [("image", (f"{i}.png", png, "image/png")) for i in range(5)]
        _error(post("/v1/classify", files=five), 413, "too_many_images")
        _error(post("/v1/classify", json={"image": "***"}), 400, "bad_request")
        _error(post("/v1/classify", json={"picture": "x"}), 400, "bad_request")
        raw = {"content": png, "headers": {"content-type": "image/png"}}
        _error(post("/v1/classify", params={"model": "nope"}, **raw), 404, "model_not_found")  # type: ignore[arg-type]
        _error(post("/v1/classify", params={"version": 7}, **raw), 404, "version_not_found")  # type: ignore[arg-type]
        _error(post("/v1/classify", params={"label": "canary"}, **raw), 404, "version_not_found")  # type: ignore[arg-type]
        _error(post("/v1/classify", params={"top_k": 0}, **raw), 400, "bad_request")  # type: ignore[arg-type]
        _error(post("/v1/classify", params={"top_k": 4}, **raw), 400, "bad_request")  # type: ignore[arg-type]
        _error(post("/v1/classify", params={"top_k": "many"}, **raw), 400, "bad_request")  # type: ignore[arg-type]
        _error(post("/v1/classify", params={"version": 1, "label": "x"}, **raw), 400, "bad_request")  # type: ignore[arg-type]
        timeout = {"content-type": "image/png", "x-request-timeout": "0.000001"}
        _error(post("/v1/classify", content=png, headers=timeout), 504, "deadline_exceeded")
        _error(
            post(
                "/v1/classify",
                content=png,
                headers={"content-type": "image/png", "x-request-timeout": "soon"},
            ),
            400,
            "bad_request",
        )
        _error(client.get("/v1/nothing"), 404, "not_found")
        _error(client.get("/v1/classify"), 405, "method_not_allowed")
        # The server is still healthy after all of that.
        assert post("/v1/classify", **raw).status_code == 200  # type: ignore[arg-type]


def test_tf_serving_status_and_metadata(server: Server) -> None:
    with server.client() as client:
        status = client.get("/v1/models/tiny").json()
        assert status == {
            "model_version_status": [
                {
                    "version": "1",
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                }
            ]
        }
        assert client.get("/v1/models/tiny/versions/1").status_code == 200
        _error(client.get("/v1/models/tiny/versions/9"), 404, "version_not_found")
        _error(client.get("/v1/models/other"), 404, "model_not_found")
        meta = client.get("/v1/models/tiny/metadata").json()
    assert meta["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
    sigs = meta["metadata"]["signature_def"]["signature_def"]
    assert set(sigs) == {"serving_default", "predict_image_bytes"}
    image = sigs["serving_default"]["inputs"]["image"]
    assert image["dtype"] == "DT_UINT8"
    assert [d["size"] for d in image["tensor_shape"]["dim"]] == ["-1", "224", "224", "3"]


def test_tf_serving_predict_formats(server: Server, repository: Path) -> None:
    png = encode(gradient(), "PNG")
    pixels = preprocess_bytes(png, PreprocessSpec(), max_pixels=10**8)
    expected = offline(repository, [png])[0]
    with server.client() as client:
        row = client.post("/v1/models/tiny:predict", json={"instances": [pixels.tolist()]})
        col = client.post(
            "/v1/models/tiny/versions/1:predict", json={"inputs": {"image": [pixels.tolist()]}}
        )
        b64 = client.post(
            "/v1/models/tiny:predict",
            json={
                "signature_name": "predict_image_bytes",
                "instances": [{"b64": base64.b64encode(png).decode()}],
            },
        )
        _error(
            client.post("/v1/models/tiny:predict", json={"instances": [[[1, 2, 3]]]}),
            400,
            "bad_request",
        )
        _error(
            client.post(
                "/v1/models/tiny:predict", json={"instances": [(pixels.astype(int) + 200).tolist()]}
            ),
            400,
            "bad_request",
        )
        _error(
            client.post("/v1/models/tiny:predict", json={"signature_name": "x", "instances": [1]}),
            400,
            "bad_request",
        )
        _error(client.post("/v1/models/tiny:predict", json={"foo": 1}), 400, "bad_request")
        _error(
            client.post(
                "/v1/models/tiny:predict",
                content=b"{",
                headers={"content-type": "application/json"},
            ),
            400,
            "bad_request",
        )
    assert row.status_code == 200, row.text
    np.testing.assert_allclose(row.json()["predictions"][0], expected, atol=1e-4)
    np.testing.assert_allclose(col.json()["outputs"][0], expected, atol=1e-4)
    assert b64.status_code == 200, b64.text
    np.testing.assert_allclose(b64.json()["predictions"][0], expected, atol=1e-4)


def test_openapi_documents_the_api(server: Server) -> None:
    with server.client() as client:
        spec = client.get("/openapi.json").json()
        assert client.get("/docs").status_code == 200
    assert "/v1/classify" in spec["paths"]
    content = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/jpeg", "application/json"} <= set(content)
