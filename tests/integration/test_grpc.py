"""The gRPC API of a real `cnnserve serve` process, through the official client stubs.

TF Serving's own stubs (tensorflow-serving-api) for Predict, GetModelMetadata and
GetModelStatus; the generated cnnserve.v1 stub for Classify; grpcio's health and
reflection clients. Answers are compared with the REST API of the same process.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from service.config import Settings
from service.preprocessing import PreprocessSpec, preprocess_bytes
from service.proto_gen import cnnserve_v1_pb2, cnnserve_v1_pb2_grpc
from tests.helpers.images import encode, gradient
from tests.helpers.models import publish_tiny, write_models_config
from tests.helpers.server import Server, running_server

pytestmark = pytest.mark.slow

LABELS = ["cat", "dog", "bird"]
CONFIG = """
config { name: "tiny" base_path: "/models/tiny" model_platform: "tensorflow"
  model_version_policy { all {} }
  version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 2 } }
config { name: "late" base_path: "/models/late" model_platform: "tensorflow" }
"""


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny (versions 1 and 2, labelled stable and canary) and "late", configured but not
    published yet: the server is not ready until the health test publishes it."""
    repo = tmp_path_factory.mktemp("grpc") / "repo"
    publish_tiny(repo, "tiny", labels=LABELS, seed=0)
    publish_tiny(repo, "tiny", labels=LABELS, seed=1)
    write_models_config(repo, CONFIG)
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[Server]:
    with running_server(
        repository,
        wait_ready=False,
        grpc_port=0,
        args=("--poll-seconds", "0.2"),
        env={"CNNSERVE_MAX_HEALTH_WATCHES": "3"},
    ) as srv:
        for version in (1, 2):  # metadata answers once the version is served
            srv.wait(f"/v1/models/tiny/versions/{version}/metadata")
        yield srv


@pytest.fixture(scope="module")
def channel(server: Server) -> Iterator[grpc.Channel]:
    with server.channel() as ch:
        yield ch


@pytest.fixture(scope="module")
def predict_stub(channel: grpc.Channel) -> Any:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def pixels(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), np.uint8)


def predict_request(
    inputs: dict[str, Any], *, version: int | None = None, label: str | None = None, **spec: str
) -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = spec.pop("name", "tiny")
    request.model_spec.signature_name = spec.pop("signature_name", "")
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    for name, value in inputs.items():
        proto = value if not isinstance(value, np.ndarray) else tf.make_tensor_proto(value)
        request.inputs[name].CopyFrom(proto)
    return request


def probabilities(response: Any) -> np.ndarray:
    return np.asarray(tf.make_ndarray(response.outputs["probabilities"]))


def code_of(call: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    error: Any = info.value
    return error.code(), error.details()


def test_predict_uint8_tensor_equals_rest_predict(server: Server, predict_stub: Any) -> None:
    images = pixels()
    response = predict_stub.Predict(predict_request({"image": images}, version=1), timeout=30)
    assert response.model_spec.name == "tiny" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    got = probabilities(response)
    assert got.shape == (2, 3) and got.dtype == np.float32
    # TF Serving answers in typed fields by default; naive clients read float_val.
    assert len(response.outputs["probabilities"].float_val) == 6
    with server.client() as client:
        rest = client.post(
            "/v1/models/tiny/versions/1:predict", json={"instances": images.tolist()}
        )
    assert rest.status_code == 200, rest.text
    np.testing.assert_allclose(got, rest.json()["predictions"], rtol=0, atol=1e-6)
    # The same pixels as typed int_val and as whole-number floats give the same answer.
    typed = tensor_pb2.TensorProto(
        dtype=tf.uint8.as_datatype_enum,
        tensor_shape=tf.TensorShape(images.shape).as_proto(),
        int_val=images.ravel().tolist(),
    )
    floats = tf.make_tensor_proto(images.astype(np.float32))
    for proto in (typed, floats):
        again = predict_stub.Predict(predict_request({"image": proto}, version=1), timeout=30)
        np.testing.assert_allclose(probabilities(again), got, atol=1e-6)


def test_a_batch_of_64_images_fits_in_one_message(predict_stub: Any) -> None:
    # As float32 pixels: 38.5 MB, the largest legitimate form (gRPC's default limit is 4 MB).
    images = pixels(64, seed=3)
    floats = predict_stub.Predict(
        predict_request({"image": images.astype(np.float32)}, version=1), timeout=60
    )
    assert probabilities(floats).shape == (64, 3)
    packed = predict_stub.Predict(predict_request({"image": images}, version=1), timeout=60)
    np.testing.assert_allclose(
        probabilities(packed),
        probabilities(floats),
        atol=1e-6,
    )


def test_bytes_signature_decodes_like_classify(predict_stub: Any) -> None:
    png, jpeg = encode(gradient(), "PNG"), encode(gradient(90, 40), "JPEG")
    request = predict_request(
        {"image_bytes": tf.make_tensor_proto([png, jpeg])},
        signature_name="predict_image_bytes",
        version=1,
    )
    response = predict_stub.Predict(request, timeout=30)
    assert response.model_spec.signature_name == "predict_image_bytes"
    decoded = np.stack(
        [preprocess_bytes(b, PreprocessSpec(), max_pixels=10**8) for b in (png, jpeg)]
    )
    direct = predict_stub.Predict(predict_request({"image": decoded}, version=1), timeout=30)
    np.testing.assert_allclose(
        probabilities(response),
        probabilities(direct),
        atol=1e-6,
    )


def test_files_without_a_signature_name_echo_the_signature_that_ran(predict_stub: Any) -> None:
    png = encode(gradient(), "PNG")
    request = predict_request({"image_bytes": tf.make_tensor_proto([png])}, version=1)
    response = predict_stub.Predict(request, timeout=30)
    assert response.model_spec.signature_name == "predict_image_bytes"  # was serving_default


def test_tf_example_apis_answer_as_tf_serving(predict_stub: Any) -> None:
    """Classify/Regress/MultiInference: NOT_FOUND for what is not served, then
    INVALID_ARGUMENT (no such signature) naming what to call; they were UNIMPLEMENTED
    for any model."""
    from tensorflow_serving.apis import classification_pb2, inference_pb2, regression_pb2

    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = "tiny"
    code, message = code_of(predict_stub.Classify, classify, timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and ":predict" in message
    classify.model_spec.name = "nope"
    assert code_of(predict_stub.Classify, classify, timeout=30)[0] == grpc.StatusCode.NOT_FOUND
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name = "tiny"
    regress.model_spec.version.value = 9
    assert code_of(predict_stub.Regress, regress, timeout=30)[0] == grpc.StatusCode.NOT_FOUND
    multi = inference_pb2.MultiInferenceRequest()
    assert code_of(predict_stub.MultiInference, multi, timeout=30)[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    multi.tasks.add().model_spec.name = "tiny"
    assert code_of(predict_stub.MultiInference, multi, timeout=30)[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_version_label_and_output_filter(predict_stub: Any) -> None:
    images = pixels(1)
    by_label = {
        label: predict_stub.Predict(predict_request({"image": images}, label=label), timeout=30)
        for label in ("stable", "canary")
    }
    assert by_label["stable"].model_spec.version.value == 1
    assert by_label["canary"].model_spec.version.value == 2
    unlabelled = predict_stub.Predict(predict_request({"image": images}), timeout=30)
    assert unlabelled.model_spec.version.value == 1  # stable, not the newest
    request = predict_request({"image": images}, label="canary")
    request.output_filter.append("probabilities")
    filtered = predict_stub.Predict(request, timeout=30)
    assert list(filtered.outputs) == ["probabilities"]
    request.output_filter[:] = ["logits"]
    code, message = code_of(predict_stub.Predict, request, timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "probabilities" in message
    # TF Serving's answers: a name twice, a signature the model lacks (it was answered,
    # and INVALID_ARGUMENT).
    request.output_filter[:] = ["probabilities", "probabilities"]
    code, message = code_of(predict_stub.Predict, request, timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "duplicate" in message
    request.output_filter[:] = []
    request.model_spec.signature_name = "nope"
    code, message = code_of(predict_stub.Predict, request, timeout=30)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "serving_default" in message


def test_get_model_metadata(predict_stub: Any) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "tiny"
    response = predict_stub.GetModelMetadata(request, timeout=10)
    assert response.model_spec.name == "tiny" and response.model_spec.version.value == 1
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    # Every signature of the graph, as TF Serving lists them (the init op was left out).
    assert set(signatures.signature_def) == {
        "serving_default",
        "predict_image_bytes",
        "__saved_model_init_op",
    }
    image = signatures.signature_def["serving_default"].inputs["image"]
    assert image.dtype == tf.uint8.as_datatype_enum
    assert [d.size for d in image.tensor_shape.dim] == [-1, 224, 224, 3]
    request.model_spec.version_label = "stable"
    assert predict_stub.GetModelMetadata(request, timeout=10).model_spec.version.value == 1
    request.metadata_field[:] = ["graph"]
    code, _ = code_of(predict_stub.GetModelMetadata, request, timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_get_model_status(channel: grpc.Channel) -> None:
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "tiny"
    response = stub.GetModelStatus(request, timeout=10)
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    # Newest first, as TF Serving lists them (clients read [0] as the newest).
    assert [(s.version, s.state) for s in response.model_version_status] == [
        (2, available),
        (1, available),
    ]
    assert all(s.status.error_code == 0 for s in response.model_version_status)
    # As TF Serving's GetModelStatus: a version_label, known or not, is not read
    # (every version); the label's version is what GetModelMetadata answers.
    for label in ("canary", "nope", ""):
        request.model_spec.version_label = label
        answer = stub.GetModelStatus(request, timeout=10)
        assert [s.version for s in answer.model_version_status] == [2, 1]
    request.model_spec.name = "nope"
    code, message = code_of(stub.GetModelStatus, request, timeout=10)
    assert code == grpc.StatusCode.NOT_FOUND and "tiny" in message
    request.model_spec.name = ""  # TF Serving: no versions of model "" (NOT_FOUND)
    code, _ = code_of(stub.GetModelStatus, request, timeout=10)
    assert code == grpc.StatusCode.NOT_FOUND
    # No model_spec at all: TF Serving's "Missing ModelSpec" (it was NOT_FOUND here).
    code, message = code_of(
        stub.GetModelStatus, get_model_status_pb2.GetModelStatusRequest(), timeout=10
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("Missing ModelSpec")


def test_classify_and_classify_batch_equal_rest(server: Server, channel: grpc.Channel) -> None:
    stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
    png, jpeg = encode(gradient(), "PNG"), encode(gradient(80, 60), "JPEG")
    one = stub.Classify(cnnserve_v1_pb2.ClassifyRequest(image=png, top_k=2), timeout=30)
    assert one.model == "tiny" and one.version == 1 and len(one.predictions) == 2
    with server.client() as client:
        rest = client.post(
            "/v1/classify",
            params={"top_k": 2},
            json={"images": [base64.b64encode(b).decode() for b in (png, jpeg)]},
        ).json()
    first = rest["results"][0]["predictions"]
    assert [(p.label, p.class_id) for p in one.predictions] == [
        (p["label"], p["class_id"]) for p in first
    ]
    for p in one.predictions:
        assert p.label == LABELS[p.class_id]
    np.testing.assert_allclose([p.score for p in one.predictions], [p["score"] for p in first])
    batch = stub.ClassifyBatch(
        cnnserve_v1_pb2.ClassifyBatchRequest(images=[png, jpeg], top_k=2), timeout=30
    )
    assert [[p.class_id for p in r.predictions] for r in batch.results] == [
        [p["class_id"] for p in r["predictions"]] for r in rest["results"]
    ]
    pinned = stub.ClassifyBatch(
        cnnserve_v1_pb2.ClassifyBatchRequest(images=[png], version_label="stable"), timeout=30
    )
    assert pinned.version == 1 and len(pinned.results[0].predictions) == 3  # all 3 classes
    assert stub.Classify(cnnserve_v1_pb2.ClassifyRequest(image=png, version=1)).version == 1


def test_error_codes(channel: grpc.Channel, predict_stub: Any) -> None:
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    predict = predict_stub.Predict
    code, message = code_of(predict, predict_request({"image": pixels(1)}, name="nope"))
    assert code == not_found and "tiny" in message
    code, _ = code_of(predict, predict_request({"image": pixels(1)}, version=9))
    assert code == not_found
    code, message = code_of(predict, predict_request({"image": pixels(1)}, label="beta"))
    assert code == invalid and "no version label 'beta'" in message  # as TF Serving
    code, message = code_of(predict, predict_request({"image": np.zeros((1, 28, 28, 1), np.uint8)}))
    assert code == invalid and "224" in message
    code, message = code_of(predict, predict_request({"image": tf.make_tensor_proto([b"x"])}))
    assert code == invalid
    strings = predict_request({"image": tf.make_tensor_proto([b"x"])})
    strings.model_spec.signature_name = "serving_default"  # named: not routed to the bytes one
    code, message = code_of(predict, strings)
    assert code == invalid and "predict_image_bytes" in message, message
    code, message = code_of(predict, predict_request({"image": pixels(1) > 100}))
    assert code == invalid and "not booleans" in message, message
    code, message = code_of(predict, predict_request({"image": pixels(1).astype(np.float16)}))
    assert code == invalid and "DT_BOOL" not in message and message.count("DT_UINT8") == 1
    code, message = code_of(predict, predict_request({"image": pixels(1).astype(np.float32) / 7}))
    assert code == invalid and "0-255" in message
    code, _ = code_of(predict, predict_request({"pixels": pixels(1)}))
    assert code == invalid
    classifier = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
    code, message = code_of(
        classifier.Classify, cnnserve_v1_pb2.ClassifyRequest(image=b"not an image")
    )
    assert code == invalid and "PNG" in message
    code, _ = code_of(
        classifier.Classify, cnnserve_v1_pb2.ClassifyRequest(image=b"x", model="nope")
    )
    assert code == not_found
    code, message = code_of(classifier.ClassifyBatch, cnnserve_v1_pb2.ClassifyBatchRequest())
    assert code == invalid and "'images' field" in message
    png = encode(gradient(), "PNG")
    code, _ = code_of(classifier.Classify, cnnserve_v1_pb2.ClassifyRequest(image=png, top_k=9))
    assert code == invalid
    code, details = code_of(
        classifier.ClassifyBatch,
        cnnserve_v1_pb2.ClassifyBatchRequest(images=[png] * 8),
        timeout=0.001,
    )
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The client's own deadline may fire first; when the server's answer arrives, it says
    # what happened (not "internal error").
    assert "internal error" not in details
    # Still serving after all of that.
    assert classifier.Classify(cnnserve_v1_pb2.ClassifyRequest(image=png), timeout=30).model


def shaped(dtype: int, dims: list[int], **values: list[Any]) -> Any:
    """A TensorProto with ``dims`` and only the ``values`` given (TF's shorthands)."""
    proto = tensor_pb2.TensorProto(dtype=dtype)  # type: ignore[arg-type]
    for d in dims:
        proto.tensor_shape.dim.add(size=d)
    for field, items in values.items():
        getattr(proto, field).extend(items)
    return proto


def test_hostile_messages_and_tensors_are_invalid_argument(
    server: Server, channel: grpc.Channel, predict_stub: Any
) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    # Bytes that are no protobuf message at all (found by a red-team pass: UNKNOWN with
    # protobuf's words and a traceback per call before).
    for method in (
        "/tensorflow.serving.PredictionService/Predict",
        "/tensorflow.serving.ModelService/GetModelStatus",
        "/cnnserve.v1.ImageClassifier/Classify",
        "/grpc.health.v1.Health/Check",
    ):
        raw = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        code, message = code_of(raw, b"\xff\xff\xff\xff", timeout=10)
        assert code == invalid and "not a valid" in message, (method, message)
    # Counted as every call is (they left no trace in the metrics or the access log).
    with server.client() as client:
        scraped = client.get("/metrics").text
    route = 'route="/grpc.health.v1.Health/Check"'  # counted only when malformed
    assert any(
        route in line and 'code="400"' in line and 'protocol="grpc"' in line
        for line in scraped.splitlines()
    ), scraped
    # Shapes far beyond any message, in a few bytes (one value, or none, fills them):
    # refused before anything is allocated, by the images they declare where they are
    # image tensors, else by the bytes they would take.
    for tensor, words in (
        (shaped(types_pb2.DT_UINT8, [2**62]), "a request may carry"),
        (shaped(types_pb2.DT_UINT8, [2**32, 2**32], int_val=[1]), "a request may carry"),
        (shaped(types_pb2.DT_DOUBLE, [2000, 224, 224, 3], double_val=[1.0]), "2000 images"),
        (shaped(types_pb2.DT_STRING, [2**40], string_val=[b"x"]), f"{2**40} images"),
        (shaped(types_pb2.DT_FLOAT, [0, 2**62, 2**62]), "a request may carry"),  # numpy refuses
        # 64 images, but 77 MB of doubles from one value: more than a message carries.
        (shaped(types_pb2.DT_DOUBLE, [64, 224, 224, 3], double_val=[1.0]), "bytes as float64"),
    ):
        code, message = code_of(predict_stub.Predict, predict_request({"image": tensor}))
        assert code == invalid and words in message, message
    # TF fills a tensor from one value in the typed fields only: packed bytes must be
    # all of it (one byte answered 200, a constant image).
    for dtype, content in ((types_pb2.DT_UINT8, b"\x07"), (types_pb2.DT_FLOAT, bytes(4))):
        tensor = shaped(dtype, [1, 224, 224, 3])
        tensor.tensor_content = content
        code, message = code_of(predict_stub.Predict, predict_request({"image": tensor}))
        assert code == invalid and "takes 150,528 values" in message, message
        assert f"holds {len(content)} bytes" in message, message
    # The bytes signature takes files: a number is refused, not turned into zero bytes.
    code, message = code_of(
        predict_stub.Predict,
        predict_request(
            {"image_bytes": shaped(types_pb2.DT_FLOAT, [2], float_val=[1.0, 2.0])},
            signature_name="predict_image_bytes",
        ),
    )
    assert code == invalid and "DT_STRING" in message
    # Files are a list [batch], as TF Serving's input: a [1]*8 tensor is no image.
    png = encode(gradient(), "PNG")
    code, message = code_of(
        predict_stub.Predict,
        predict_request(
            {"image_bytes": shaped(types_pb2.DT_STRING, [1] * 8, string_val=[png])},
            signature_name="predict_image_bytes",
        ),
    )
    assert code == invalid and "shape [batch]" in message, message
    # No file at all: said in the tensor's terms, not /v1/classify's fields.
    code, message = code_of(
        predict_stub.Predict,
        predict_request(
            {"image_bytes": shaped(types_pb2.DT_STRING, [0])},
            signature_name="predict_image_bytes",
        ),
    )
    assert code == invalid and "'image_bytes' holds no image" in message, message
    # Encoded files without a signature name go to the bytes signature, as over REST.
    files = shaped(types_pb2.DT_STRING, [2], string_val=[png, png])
    answer = predict_stub.Predict(predict_request({"image": files}), timeout=30)
    assert probabilities(answer).shape == (2, 3)
    # Version 0 is a version (TF Serving serves a "0" folder): this model has none. A
    # negative one is a bad request.
    classifier = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
    code, message = code_of(
        classifier.Classify, cnnserve_v1_pb2.ClassifyRequest(image=png, version=0)
    )
    assert code == grpc.StatusCode.NOT_FOUND and "0" in message
    code, message = code_of(
        classifier.Classify, cnnserve_v1_pb2.ClassifyRequest(image=png, version=-1)
    )
    assert code == invalid and "0 or more" in message
    with server.client() as client:
        r = client.post(
            "/v1/classify?version=0", content=png, headers={"content-type": "image/png"}
        )
        assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"
    log = server.log.read_text()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]


def test_reflection_lists_every_service(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    assert set(database.get_services()) == {
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
        "cnnserve.v1.ImageClassifier",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    pool = descriptor_pool.DescriptorPool(database)
    classifier = pool.FindServiceByName("cnnserve.v1.ImageClassifier")
    batch = classifier.methods_by_name["ClassifyBatch"]
    assert batch.input_type.full_name == "cnnserve.v1.ClassifyBatchRequest"
    predict = pool.FindServiceByName("tensorflow.serving.PredictionService")
    assert "inputs" in predict.methods_by_name["Predict"].input_type.fields_by_name


def test_health_follows_readiness(server: Server, repository: Path, channel: grpc.Channel) -> None:
    """NOT_SERVING while a configured model has no version, SERVING once it has one."""
    health = health_pb2_grpc.HealthStub(channel)
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", "tensorflow.serving.PredictionService", "cnnserve.v1.ImageClassifier"):
        check = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert check.status == not_serving
    code, _ = code_of(health.Check, health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert code == grpc.StatusCode.NOT_FOUND
    with server.client() as client:
        assert client.get("/readyz").status_code == 503
        # As TF Serving: a model with no version is NOT_FOUND, not an empty list.
        late = client.get("/v1/models/late")
        assert late.status_code == 404 and "any versions" in late.json()["error"]
    status_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "late"
    assert code_of(status_stub.GetModelStatus, request, timeout=5)[0] == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
    try:
        assert next(watch).status == not_serving
        publish_tiny(repository, "late", labels=LABELS)
        # Watch streams each change: the next message is the switch to SERVING.
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        watch.cancel()
    with server.client() as client:
        assert client.get("/readyz").status_code == 200
    listed = health.List(health_pb2.HealthListRequest(), timeout=5).statuses
    assert listed["cnnserve.v1.ImageClassifier"].status == health_pb2.HealthCheckResponse.SERVING


def test_health_watches_are_bounded_and_never_shut_calls_out(
    server: Server, channel: grpc.Channel, predict_stub: Any
) -> None:
    """Watch needs no key and holds a place for calls in progress while it lasts: past
    CNNSERVE_MAX_HEALTH_WATCHES (3 here) a Watch is refused, Predict and Check still
    answer, and a closed Watch frees its place (a red-team pass shut every call out
    with 3,000 Watch streams before)."""
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="")
    watches = [health.Watch(request, timeout=60) for _ in range(3)]
    try:
        for watch in watches:
            next(watch)  # open and answering
        refused = health.Watch(request, timeout=10)
        code, message = code_of(next, refused)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Watch" in message
        assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        assert probabilities(
            predict_stub.Predict(predict_request({"image": pixels(1)}), timeout=30)
        ).shape == (1, 3)
        watches.pop().cancel()
        again = health.Watch(request, timeout=60)
        deadline = time.monotonic() + 30  # the cancelled stream's place is freed on the server
        while True:
            try:
                next(again)
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "a closed Watch never freed its place"
                again = health.Watch(request, timeout=60)
        watches.append(again)
    finally:
        for watch in watches:
            watch.cancel()


def listeners(port: int) -> int:
    """Listening TCP sockets on ``port`` (Linux /proc: state 0A is LISTEN; gRPC binds
    IPv4 addresses as IPv4-mapped IPv6, so both tables count)."""
    rows = [
        row.split()
        for table in ("tcp", "tcp6")
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]
    ]
    return sum(1 for r in rows if r[1].endswith(f":{port:04X}") and r[3] == "0A")


def test_several_workers_share_the_grpc_port(repository: Path) -> None:
    """Each uvicorn worker binds the gRPC port with each of its listeners (SO_REUSEPORT);
    the kernel spreads connections over them."""
    args = ("--workers", "2", "--poll-seconds", "0")
    expected = 2 * Settings().grpc_listeners
    with running_server(repository, wait_ready=False, grpc_port=0, args=args) as srv:
        deadline = time.monotonic() + 120
        while listeners(srv.grpc_port) < expected:
            assert time.monotonic() < deadline and srv.process.poll() is None, srv.log.read_text()
            time.sleep(0.1)
        versions = set()
        with srv.channel() as ch:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            request = predict_request({"image": pixels(1)}, version=1)
            while len(versions) < 1 and time.monotonic() < deadline:
                try:  # a worker still loading answers UNAVAILABLE, by design
                    versions.add(stub.Predict(request, timeout=30).model_spec.version.value)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc  # type: ignore[attr-defined]
                    time.sleep(0.1)
        assert versions == {1}
        assert listeners(srv.grpc_port) == expected and "Traceback" not in srv.log.read_text()


def test_calls_are_counted_and_tagged_like_rest(server: Server, predict_stub: Any) -> None:
    """gRPC calls land in the same request metrics as REST (protocol="grpc", the RPC as
    route, the HTTP-equivalent status) and carry the request id back in the trailers."""
    _, call = predict_stub.Predict.with_call(
        predict_request({"image": pixels(1)}, version=1),
        metadata=(("x-request-id", "grpc-abc"),),
        timeout=30,
    )
    assert ("x-request-id", "grpc-abc") in tuple(call.trailing_metadata())
    code, _ = code_of(
        predict_stub.Predict, predict_request({"image": pixels(1)}, name="nope"), timeout=30
    )
    assert code == grpc.StatusCode.NOT_FOUND
    with server.client() as client:
        scraped = client.get("/metrics").text
    route = 'route="/tensorflow.serving.PredictionService/Predict"'
    ok = [line for line in scraped.splitlines() if route in line and 'code="200"' in line]
    assert any('protocol="grpc"' in line and 'model="tiny"' in line for line in ok), scraped
    # The unknown name is not a label value: 404s of unknown models count under model="".
    missing = [line for line in scraped.splitlines() if route in line and 'code="404"' in line]
    assert missing and not any("nope" in line for line in scraped.splitlines())
