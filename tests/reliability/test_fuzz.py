"""Property-based fuzzing (hypothesis) of image decoding and request parsing: whatever the
bytes, decoding returns a model input or raises one of our 4xx errors, and the server
answers every request below 500 with a JSON error body. CI runs a short budget; `make
fuzz` runs the `fuzz` profile (HYPOTHESIS_PROFILE=fuzz) with many more examples."""

from __future__ import annotations

import json

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from service.errors import CnnserveError
from service.preprocessing import PreprocessSpec, preprocess_bytes
from service.proto_gen import cnnserve_v1_pb2, cnnserve_v1_pb2_grpc
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
    signature=st.sampled_from(["serving_default", "predict_image_bytes", "", "x"]),
    key=st.sampled_from(["instances", "inputs"]),
    value=json_values,
)
def test_any_predict_body_for_each_signature(
    server: Server, signature: str, key: str, value: object
) -> None:
    # Both keys at once: a red-team pass found 500s for the bytes signature this way.
    body = json.dumps({"signature_name": signature, key: value})
    headers = {"content-type": "application/json"}
    path = f"{server.url}/v1/models/tiny:predict"
    assert_clean(httpx.post(path, content=body, headers=headers, timeout=30))


# Statuses a Predict may end with; never INTERNAL or UNKNOWN.
GRPC_CLEAN = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


@st.composite
def tensors(draw: st.DrawFn) -> tensor_pb2.TensorProto:
    """A TensorProto of any dtype (unknown ones too), any shape (huge, negative, unknown
    rank) and a few values in any of its fields: what a hostile client can send."""
    proto = tensor_pb2.TensorProto(dtype=draw(st.integers(0, 30)))
    dims = draw(st.lists(st.integers(-2, 2**62) | st.sampled_from([1, 3, 224]), max_size=5))
    for d in dims:
        proto.tensor_shape.dim.add(size=d)
    proto.tensor_shape.unknown_rank = draw(st.booleans()) and draw(st.booleans())
    field = draw(st.sampled_from(["int_val", "float_val", "string_val", "tensor_content", None]))
    if field == "int_val":
        proto.int_val.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8)))
    elif field == "float_val":
        proto.float_val.extend(draw(st.lists(st.floats(width=32), max_size=8)))
    elif field == "string_val":
        proto.string_val.extend(draw(st.lists(st.sampled_from([b"", b"x", SEEDS[0]]), max_size=3)))
    elif field == "tensor_content":
        proto.tensor_content = draw(st.binary(max_size=64))
    return proto


@settings(deadline=None, suppress_health_check=SERVER_CHECKS)
@given(
    tensor=tensors(),
    name=st.sampled_from(["image", "image_bytes", "x"]),
    signature=st.sampled_from(["", "serving_default", "predict_image_bytes"]),
)
def test_any_predict_tensor(server: Server, tensor: object, name: str, signature: str) -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    request.model_spec.signature_name = signature
    request.inputs[name].CopyFrom(tensor)
    with server.channel() as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            stub.Predict(request, timeout=30)
        except grpc.RpcError as error:
            assert error.code() in GRPC_CLEAN, (error.code(), error.details())


int64s = st.integers(-(2**63), 2**63 - 1) | st.sampled_from([0, 1, 2, 2**31])
names = st.text(max_size=12) | st.sampled_from(["tiny", "tiny/1", "..", ""])


@settings(deadline=None, suppress_health_check=SERVER_CHECKS)
@given(
    name=names,
    version=st.none() | int64s,
    label=st.none() | st.text(max_size=10) | st.sampled_from(["stable", "canary"]),
    top_k=st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 1, 3, 5]),
)
def test_any_model_spec_on_every_grpc_method(
    server: Server, name: str, version: int | None, label: str | None, top_k: int
) -> None:
    spec = model_pb2.ModelSpec(name=name)
    if version is not None:
        spec.version.value = version
    elif label is not None:
        spec.version_label = label
    classify = cnnserve_v1_pb2.ClassifyRequest(image=SEEDS[0], model=name, top_k=top_k)
    if version is not None:
        classify.version = version
    elif label is not None:
        classify.version_label = label
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=spec, metadata_field=["signature_def"]
    )
    with server.channel() as channel:
        calls = [
            (model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus,
             get_model_status_pb2.GetModelStatusRequest(model_spec=spec)),
            (prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata, metadata),
            (cnnserve_v1_pb2_grpc.ImageClassifierStub(channel).Classify, classify),
        ]  # fmt: skip
        for call, request in calls:
            try:
                call(request, timeout=30)
            except grpc.RpcError as error:
                assert error.code() in GRPC_CLEAN, (call, error.code(), error.details())


@settings(deadline=None, suppress_health_check=SERVER_CHECKS)
@given(st.binary(max_size=256))
def test_any_bytes_as_a_predict_message(server: Server, data: bytes) -> None:
    with server.channel() as channel:
        raw = channel.unary_unary(
            "/tensorflow.serving.PredictionService/Predict",
            request_serializer=None,
            response_deserializer=None,
        )
        try:
            raw(data, timeout=30)
        except grpc.RpcError as error:
            assert error.code() in GRPC_CLEAN, (error.code(), error.details())


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
