"""The REST API of a real `cnnserve serve` process, on a small generated model."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from service.preprocessing import PreprocessSpec, preprocess_bytes
from tests.helpers.images import encode, gradient
from tests.helpers.server import Server, read_response, running_server

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


def test_the_first_of_two_request_ids_is_echoed_on_every_path(server: Server) -> None:
    ids = [("x-request-id", "one"), ("x-request-id", "two")]
    with server.client() as client:
        for response in (
            client.post("/v1/classify", content=encode(gradient(), "PNG"),
                        headers=[("content-type", "image/png"), *ids]),  # the direct path
            client.get("/v1/models/tiny", headers=ids),
            client.get("/nope", headers=ids),
        ):  # fmt: skip
            assert response.headers.get_list("x-request-id") == ["one"], response.url


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


def test_an_image_part_without_a_filename_is_the_same_image(server: Server) -> None:
    """curl's ``-F image=<file.png`` sends no filename: Starlette hands such a part over
    as text, decoded as latin-1 (an image is not valid UTF-8), and it was re-encoded as
    UTF-8, a corrupt file (400). Over 1 MiB it was refused as a field too large."""
    png, jpeg = encode(gradient(), "PNG"), encode(gradient(80, 60), "JPEG")
    noise = np.random.default_rng(3).integers(0, 256, (640, 640, 3), np.uint8)
    big = encode(Image.fromarray(noise, "RGB"), "PNG")
    assert len(big) > 1024 * 1024
    with server.client() as client:
        for data, kind in ((png, "image/png"), (jpeg, "image/jpeg"), (big, "image/png")):
            named = client.post("/v1/classify", files={"image": ("a", data, kind)})
            unnamed = client.post("/v1/classify", files={"image": (None, data, kind)})
            assert named.status_code == 200, named.text
            assert unnamed.status_code == 200, unnamed.text
            assert unnamed.json() == named.json()
        both_named = client.post(
            "/v1/classify",
            files=[("image", ("a", png, "image/png")), ("image", ("b", jpeg, "image/jpeg"))],
        )
        second_unnamed = client.post(
            "/v1/classify",
            files=[("image", ("a", png, "image/png")), ("image", (None, jpeg, "image/jpeg"))],
        )
    assert both_named.status_code == 200, both_named.text
    assert second_unnamed.status_code == 200, second_unnamed.text
    assert second_unnamed.json() == both_named.json()


def _error(response: httpx.Response, status: int, code: str) -> str:
    """The message of an error answer, after checking its status and code: in the body's
    ``error.code``, or TF Serving's ``{"error": "<message>"}`` under /v1/models; in the
    X-Error-Code header on both."""
    r = response
    assert r.status_code == status, r.text
    assert r.headers["x-error-code"] == code, r.headers
    body = r.json()
    if r.request.url.path.startswith("/v1/models"):
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        message: str = body["error"]
    else:
        assert body["error"]["code"] == code, body
        message = body["error"]["message"]
    assert message
    return message


PNG = encode(gradient(), "PNG")
RAW = {"content": PNG, "headers": {"content-type": "image/png"}}
BIG = encode(
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (900, 900, 3), np.uint8)), "PNG"
)
FIVE = [("image", (f"{i}.png", PNG, "image/png")) for i in range(5)]


def _png_headers(**extra: str) -> dict[str, str]:
    return {"content-type": "image/png", **extra}


# (id, method, path, httpx keyword arguments, status, code, words the message must hold)
ERROR_CASES: list[tuple[str, str, str, dict[str, Any], int, str, tuple[str, ...]]] = [
    (
        "undecodable",
        "POST",
        "/v1/classify",
        {"content": b"not an image", "headers": _png_headers()},
        400,
        "invalid_image",
        ("PNG",),
    ),
    (
        "svg",
        "POST",
        "/v1/classify",
        {"content": b"<svg/>", "headers": {"content-type": "image/svg+xml"}},
        415,
        "unsupported_media_type",
        ("image/svg+xml", "JPEG"),
    ),
    (
        "no-media-type",  # it said the request had no Content-Type header
        "POST",
        "/v1/classify",
        {"content": PNG, "headers": {"content-type": ";;;==="}},
        415,
        "unsupported_media_type",
        ("';;;===' names no media type",),
    ),
    (
        "two-content-types",  # the first counted: answered 200 as a PNG
        "POST",
        "/v1/classify",
        {
            "content": PNG,
            "headers": [("content-type", "image/png"), ("content-type", "image/jpeg")],
        },
        400,
        "bad_request",
        ("2 Content-Type headers",),
    ),
    (
        "text-plain",
        "POST",
        "/v1/classify",
        {"content": PNG, "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
        (),
    ),
    (
        "body-too-large",
        "POST",
        "/v1/classify",
        {"content": BIG, "headers": _png_headers()},
        413,
        "payload_too_large",
        ("CNNSERVE_MAX_BODY_BYTES",),
    ),
    (
        "chunked-too-large",
        "POST",
        "/v1/classify",
        {"content": lambda: iter([BIG[:1_000_000], BIG[1_000_000:]]), "headers": _png_headers()},
        413,
        "payload_too_large",
        (),
    ),
    (
        "too-many-pixels",
        "POST",
        "/v1/classify",
        {"content": encode(Image.new("L", (2000, 2000)), "PNG"), "headers": _png_headers()},
        413,
        "image_too_large",
        ("CNNSERVE_MAX_IMAGE_PIXELS",),
    ),
    (
        "too-many-images",
        "POST",
        "/v1/classify",
        {"files": FIVE},
        413,
        "too_many_images",
        ("CNNSERVE_MAX_IMAGES_PER_REQUEST",),
    ),
    (
        "bad-base64",
        "POST",
        "/v1/classify",
        {"json": {"image": "***"}},
        400,
        "bad_request",
        ("base64",),
    ),
    (
        "json-without-image",
        "POST",
        "/v1/classify",
        {"json": {"picture": "x"}},
        400,
        "bad_request",
        ('"image"',),
    ),
    (
        "unknown-model",
        "POST",
        "/v1/classify",
        {**RAW, "params": {"model": "nope"}},
        404,
        "model_not_found",
        ("tiny",),
    ),
    (
        "unknown-version",
        "POST",
        "/v1/classify",
        {**RAW, "params": {"version": 7}},
        404,
        "version_not_found",
        (),
    ),
    (
        "version-as-float",  # int() and pydantic took "1.0" as 1 and "1_0" as 10
        "POST",
        "/v1/classify",
        {**RAW, "params": {"version": "1.0"}},
        400,
        "bad_request",
        ("digits",),
    ),
    (
        "top-k-negative",  # said "digits 0-9", not what was wrong
        "POST",
        "/v1/classify",
        {**RAW, "params": {"top_k": "-1"}},
        400,
        "bad_request",
        ("no sign, got '-1'",),
    ),
    (
        "version-past-int64",  # a 404 here, a 400 in a path
        "POST",
        "/v1/classify",
        {**RAW, "params": {"version": "1" * 23}},
        400,
        "bad_request",
        ("within int64",),
    ),
    (
        "top-k-underscore",
        "POST",
        "/v1/classify",
        {**RAW, "params": {"top_k": "1_0"}},
        400,
        "bad_request",
        ("digits",),
    ),
    (
        "unknown-label",
        "POST",
        "/v1/classify",
        {**RAW, "params": {"label": "canary"}},
        400,
        "unknown_version_label",
        (),
    ),
    (
        "top-k-zero",
        "POST",
        "/v1/classify",
        {**RAW, "params": {"top_k": 0}},
        400,
        "bad_request",
        ("top_k",),
    ),
    (
        "top-k-above-classes",
        "POST",
        "/v1/classify",
        {**RAW, "params": {"top_k": 4}},
        400,
        "bad_request",
        ("top_k",),
    ),
    (
        "top-k-not-a-number",
        "POST",
        "/v1/classify",
        {**RAW, "params": {"top_k": "many"}},
        400,
        "bad_request",
        ("top_k",),
    ),
    (
        "version-and-label",
        "POST",
        "/v1/classify",
        {**RAW, "params": {"version": 1, "label": "x"}},
        400,
        "bad_request",
        ("not both",),
    ),
    (
        "deadline-passed",
        "POST",
        "/v1/classify",
        {"content": PNG, "headers": _png_headers(**{"x-request-timeout": "0.000001"})},
        504,
        "deadline_exceeded",
        ("deadline",),
    ),
    (
        "bad-timeout-header",
        "POST",
        "/v1/classify",
        {"content": PNG, "headers": _png_headers(**{"x-request-timeout": "soon"})},
        400,
        "bad_request",
        ("x-request-timeout",),
    ),
    (
        "infinite-timeout",  # would turn the deadline off
        "POST",
        "/v1/classify",
        {"content": PNG, "headers": _png_headers(**{"x-request-timeout": "inf"})},
        400,
        "bad_request",
        ("seconds as a number",),
    ),
    (
        "timeout-with-underscore",  # float() took "1_0" as 10 s
        "POST",
        "/v1/classify",
        {"content": PNG, "headers": _png_headers(**{"x-request-timeout": "1_0"})},
        400,
        "bad_request",
        ("seconds as a number",),
    ),
    (
        "multipart-unknown-field",  # -F model=x was answered by the default model
        "POST",
        "/v1/classify",
        {"files": [("image", ("a.png", PNG, "image/png"))], "data": {"model": "x"}},
        400,
        "bad_request",
        ("unknown field 'model' in the multipart body", "query parameters"),
    ),
    (
        "json-classify-both-image-fields",
        "POST",
        "/v1/classify",
        {"json": {"image": "aGk=", "images": ["aGk="]}},
        400,
        "bad_request",
        ("'image'", "'images'"),
    ),
    ("no-route", "GET", "/v1/nothing", {}, 404, "not_found", ("/docs",)),
    ("wrong-method", "GET", "/v1/classify", {}, 405, "method_not_allowed", ()),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code", "words"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_error_paths(
    server: Server,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    code: str,
    words: tuple[str, ...],
) -> None:
    kwargs = {k: v() if callable(v) else v for k, v in kwargs.items()}
    sent = kwargs.pop("headers", {})  # a dict, or a list of (name, value) for repeated names
    headers = [*(sent.items() if isinstance(sent, dict) else sent), ("x-request-id", f"err-{code}")]
    with server.client() as client:
        response = client.request(method, path, headers=headers, **kwargs)
        message = _error(response, status, code)
        for word in words:
            assert word in message
        # Tagged once, also when refused before the app ran (Content-Length).
        assert response.headers.get_list("x-request-id") == [f"err-{code}"]
        # The server is still healthy after it.
        assert client.post("/v1/classify", **RAW).status_code == 200  # type: ignore[arg-type]


def test_an_empty_model_or_label_parameter_means_none_given(server: Server) -> None:
    """As an empty gRPC field does (a 404 "no model named ''" and a 400 "no version
    label ''" before)."""
    with server.client() as client:
        for route in ("direct", "json"):
            sent = RAW if route == "direct" else {"json": {"image": base64.b64encode(PNG).decode()}}
            for params in ({"model": ""}, {"label": ""}, {"version": 1, "label": ""}):
                answer = client.post("/v1/classify", params=params, **sent)  # type: ignore[arg-type]
                assert answer.status_code == 200, (params, answer.text)
                assert answer.json()["model"] == "tiny"


def test_an_unknown_query_parameter_is_refused_not_ignored(server: Server) -> None:
    """A typo ("?lable=canary", "?versoin=2") was answered by the default version."""
    with server.client() as client:
        for sent in (RAW, {"json": {"image": base64.b64encode(PNG).decode()}}):
            answer = client.post("/v1/classify", params={"versoin": 2}, **sent)
            message = _error(answer, 400, "bad_request")
            assert "'versoin'" in message and "version" in message


def test_tf_serving_verbs_other_than_predict_say_what_to_do(server: Server) -> None:
    """:classify and :regress (tf.Example input) are, as in TF Serving, 404 for a model
    or version not served, else 400 (no such signature) with the way to send images;
    GET on a verb is 405 Allow: POST; an unknown verb is no route. Before, the model
    status route took these paths: 405 Allow: GET, or 404 model_not_found; then 501
    for any model."""
    with server.client() as client:
        for path in ("/v1/models/tiny:classify", "/v1/models/tiny/versions/1:regress"):
            message = _error(client.post(path, json={"examples": []}), 400, "bad_request")
            assert ":predict" in message and "/v1/classify" in message, path
        _error(client.post("/v1/models/nope:classify", json={}), 404, "model_not_found")
        _error(client.post("/v1/models/tiny/versions/9:regress"), 404, "version_not_found")
        for path in (
            "/v1/models/tiny:predict",
            "/v1/models/tiny/versions/1:predict",
            "/v1/models/tiny:classify",
        ):
            wrong = client.get(path)
            _error(wrong, 405, "method_not_allowed")
            assert wrong.headers["allow"] == "POST", path
            # Any other method names the same (the router named its first match: GET).
            other = client.options(path)
            _error(other, 405, "method_not_allowed")
            assert other.headers["allow"] == "POST", path
        for path, allow in (("/v1/models/tiny", "GET, HEAD"), ("/v1/classify", "POST")):
            assert client.request("PUT", path).headers["allow"] == allow, path
        _error(client.post("/v1/models/tiny:frobnicate", json={}), 404, "not_found")
        # A GET with another verb still reads as a model name with a colon in it.
        _error(client.get("/v1/models/tiny:frobnicate"), 404, "model_not_found")
        assert client.post("/v1/classify", **RAW).status_code == 200  # type: ignore[arg-type]


def test_an_empty_model_version_or_label_in_a_verb_path_says_which(server: Server) -> None:
    """The status routes took these paths (":predict" as a name or label) and answered a
    POST 405 Allow: GET, HEAD, as though the method were wrong."""
    with server.client() as client:
        for path, part in (
            ("/v1/models/:predict", "model name"),
            ("/v1/models/tiny/versions/:predict", "version"),
            ("/v1/models/tiny/labels/:predict", "version label"),
            ("/v1/models/tiny/labels/:classify", "version label"),
        ):
            answer = client.post(path, json={"instances": [1]})
            message = _error(answer, 400, "bad_request")
            assert f"the {part} in {path} is empty" in message, message
            assert "allow" not in answer.headers, path
        _error(client.post("/v1/models/:frobnicate", json={}), 404, "not_found")
        # GET still reads the path as the status of a model named ":predict".
        _error(client.get("/v1/models/:predict"), 404, "model_not_found")


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
        # TF Serving: 400 "Missing model name in request." (it was our 404 no route)
        for path in ("/v1/models", "/v1/models/"):
            _error(client.get(path), 400, "bad_request")
        meta = client.get("/v1/models/tiny/metadata").json()
    assert meta["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
    sigs = meta["metadata"]["signature_def"]["signature_def"]
    assert set(sigs) == {"serving_default", "predict_image_bytes", "__saved_model_init_op"}
    image = sigs["serving_default"]["inputs"]["image"]
    assert image["dtype"] == "DT_UINT8"
    assert [d["size"] for d in image["tensor_shape"]["dim"]] == ["-1", "224", "224", "3"]
    # Printed as TF Serving prints it: fields at their defaults included.
    assert image["tensor_shape"]["unknown_rank"] is False
    assert all(d["name"] == "" for d in image["tensor_shape"]["dim"])


def test_tf_serving_predict_formats(server: Server, repository: Path) -> None:
    png = encode(gradient(), "PNG")
    pixels = preprocess_bytes(png, PreprocessSpec(), max_pixels=10**8)
    expected = offline(repository, [png])[0]
    with server.client() as client:
        row = client.post("/v1/models/tiny:predict", json={"instances": [pixels.tolist()]})
        col = client.post(
            "/v1/models/tiny/versions/1:predict", json={"inputs": {"image": [pixels.tolist()]}}
        )
        # Keys the signature does not take are ignored in the columnar format, as in TF
        # Serving (the row format's instances must name exactly its inputs there too).
        extra = client.post(
            "/v1/models/tiny:predict", json={"inputs": {"image": [pixels.tolist()], "x": [1]}}
        )
        b64 = client.post(
            "/v1/models/tiny:predict",
            json={
                "signature_name": "predict_image_bytes",
                "instances": [{"b64": base64.b64encode(png).decode()}],
            },
        )
        # TF Serving clients often omit signature_name for files: routed to the bytes one.
        unnamed = client.post(
            "/v1/models/tiny:predict",
            json={"instances": [{"b64": base64.b64encode(png).decode()}]},
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
            "unknown_signature",
        )
        _error(client.post("/v1/models/tiny:predict", json={"foo": 1}), 400, "bad_request")
        # Files are a list [batch], as TF Serving's input: 40 lists around one are refused.
        nested: object = {"b64": base64.b64encode(png).decode()}
        for _ in range(40):
            nested = [nested]
        deep = client.post(
            "/v1/models/tiny:predict",
            json={"signature_name": "predict_image_bytes", "inputs": nested},
        )
        assert "shape [batch]" in _error(deep, 400, "bad_request"), deep.text
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
    assert extra.status_code == 200, extra.text
    np.testing.assert_allclose(extra.json()["outputs"][0], expected, atol=1e-4)
    assert b64.status_code == 200, b64.text
    np.testing.assert_allclose(b64.json()["predictions"][0], expected, atol=1e-4)
    assert unnamed.status_code == 200, unnamed.text
    np.testing.assert_allclose(unnamed.json()["predictions"][0], expected, atol=1e-4)


def test_pixel_lists_of_every_shape_and_type_read_as_numpy_reads_them(
    server: Server, repository: Path
) -> None:
    """A body of pixel lists over 256 KiB (one image's is ~0.6 MB) is parsed in pieces
    and made arrays off the event loop, an image at a time (service.api.json_pieces,
    service.dataplane.pixel_array): as np.asarray reads the whole, refusals included."""
    png = encode(gradient(), "PNG")
    pixels = preprocess_bytes(png, PreprocessSpec(), max_pixels=10**8).tolist()
    expected = offline(repository, [png])[0]
    floats = [[[float(v) for v in px] for px in row] for row in pixels]
    mixed = [floats[0], *pixels[1:]]  # one row of floats: the whole image float64

    def with_value(value: object) -> list[object]:
        image = [list(row) for row in pixels]
        image[100] = [list(px) for px in image[100]]
        image[100][7] = [1, value, 3]
        return image

    bodies = {
        "ints": {"instances": [pixels, pixels]},
        "floats": {"instances": [floats]},
        "an image of floats beside one of ints": {"instances": [floats, pixels]},
        "a row of floats": {"instances": [mixed]},
        "named rows": {"instances": [{"image": pixels}, {"image": floats}]},
        "columns": {"inputs": {"image": [pixels]}},
    }
    refused = {
        "a boolean": ({"instances": [with_value(True)]}, "JSON boolean"),
        "a fraction": ({"instances": [with_value(1.5)]}, "got a fraction"),
        "a string": ({"instances": [pixels, with_value("x")]}, "got 'x'"),
        "a null": ({"instances": [with_value(None)]}, "got None"),
        "a ragged image": ({"instances": [pixels, pixels[:-1]]}, "ragged"),
        "a ragged pixel": ({"instances": [with_value([1, 2])]}, "ragged"),
        "over 255": ({"instances": [with_value(256)]}, "0-255"),
    }
    with server.client() as client:
        for name, body in bodies.items():
            response = client.post("/v1/models/tiny:predict", json=body)
            assert response.status_code == 200, (name, response.text)
            answer = response.json()
            for scores in answer.get("predictions") or answer["outputs"]:
                np.testing.assert_allclose(scores, expected, atol=1e-4, err_msg=name)
        for name, (body, said) in refused.items():
            message = _error(client.post("/v1/models/tiny:predict", json=body), 400, "bad_request")
            assert said in message, (name, message)


def test_a_bad_image_among_several_is_named(server: Server) -> None:
    png = encode(gradient(), "PNG")
    files = [
        ("image", ("front.png", png, "image/png")),
        ("image", ("broken.png", b"not a png", "image/png")),
    ]
    with server.client() as client:
        message = _error(client.post("/v1/classify", files=files), 400, "invalid_image")
        assert message.startswith("image 1 ('broken.png'): ")
        images = [base64.b64encode(png).decode(), base64.b64encode(b"junk").decode()]
        message = _error(client.post("/v1/classify", json={"images": images}), 400, "invalid_image")
        assert message.startswith("image 1: ")


def _expired_total(client: Any) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('cnnserve_deadline_expirations_total{model="tiny"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_every_deadline_answer_is_counted(server: Server) -> None:
    headers = {"content-type": "image/png", "x-request-timeout": "0.000001"}
    with server.client() as client:
        before = _expired_total(client)
        answers = [
            client.post("/v1/classify", content=PNG, headers=headers).status_code for _ in range(4)
        ]
        assert answers == [504] * 4
        assert _expired_total(client) - before == 4


def test_the_log_says_once_what_is_served_where(server: Server) -> None:
    lines = [line for line in server.log.read_text().splitlines() if "ready: serving" in line]
    assert len(lines) == 1, server.log.read_text()
    assert f"tiny version 1 (litert); REST {server.url}" in lines[0]


def test_openapi_documents_the_api(server: Server) -> None:
    with server.client() as client:
        spec = client.get("/openapi.json").json()
        assert client.get("/docs").status_code == 200
    assert "/v1/classify" in spec["paths"]
    content = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/jpeg", "application/json"} <= set(content)


def test_one_connection_keeps_http_semantics_with_head_and_body_written_together(
    server: Server,
) -> None:
    """Responses leave with head and body in one write (service.api.http_protocol's
    JoinedWrites); what HTTP/1.1 clients rely on still holds on one keep-alive
    connection: a HEAD answer (a head and no body), pipelined requests answered in
    order, and Expect: 100-continue answered before the client sends the body."""
    png = encode(gradient(), "PNG")
    post = (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: %d\r\n" % len(png)
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body, rest = read_response(sock, head_request=True)
        assert head.startswith(b"HTTP/1.1 200") and body == b"" == rest, head
        assert b"content-length: " in head.lower()  # the GET answer's, without its body

        sock.sendall(post + b"\r\n" + png + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first, classified, rest = read_response(sock)
        second, health, rest = read_response(sock, rest)
        assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200")
        assert json.loads(classified)["model"] == "tiny"
        assert "status" in json.loads(health) and rest == b""

        sock.sendall(post + b"Expect: 100-continue\r\n\r\n")  # the headers alone
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
        sock.sendall(png)
        final, classified, _ = read_response(sock, interim.partition(b"\r\n\r\n")[2])
        assert final.startswith(b"HTTP/1.1 200"), final
        assert json.loads(classified)["predictions"]


def test_every_get_route_answers_head_as_it_answers_get(server: Server) -> None:
    """HEAD is GET without the body (RFC 9110): probes, model status, metrics, the demo
    page and a GET route's errors alike; a path without GET says which methods it takes;
    the API's OpenAPI document lists no HEAD operations."""
    paths = [
        "/healthz",
        "/readyz",
        "/v1/models/tiny",
        "/v1/models/tiny/metadata",
        "/metrics",
        "/",
        "/v1/models/nosuchmodel",  # 404 with its JSON error
    ]
    with server.client() as client:
        for path in paths:
            got, head = client.get(path), client.head(path)
            assert head.status_code == got.status_code, (path, head.status_code, got.status_code)
            assert head.content == b"", path
            assert head.headers["content-type"] == got.headers["content-type"], path
            if path != "/metrics":  # its body grows with each request counted
                assert head.headers["content-length"] == str(len(got.content)), path
        post_only = client.head("/v1/classify")
        assert post_only.status_code == 405 and "POST" in post_only.headers["allow"]
        spec = client.get("/openapi.json").json()["paths"]
        assert all("head" not in operations for operations in spec.values())


def test_every_405_names_head_beside_get(server: Server) -> None:
    """/metrics and /docs named GET alone, though HEAD is answered on every GET path."""
    with server.client() as client:
        for path in ("/metrics", "/docs", "/v1/models/tiny"):
            answer = client.post(path)
            assert answer.status_code == 405, path
            assert {"GET", "HEAD"} <= set(answer.headers["allow"].split(", ")), path
            assert client.head(path).status_code == 200, path
        # A stray Content-Encoding on a request without a body decodes nothing: no 415.
        assert client.get("/readyz", headers={"content-encoding": "br"}).status_code == 200
