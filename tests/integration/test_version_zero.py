"""A version folder named 0, which TF Serving serves (its folder names are any int64), is
served and addressed by number on every API, and the next one published beside it is 1."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from service.proto_gen import cnnserve_v1_pb2, cnnserve_v1_pb2_grpc
from service.tfserving_proto import model_spec
from tests.helpers.models import publish_tiny, simple_config, write_models_config
from tests.helpers.server import Server

pytestmark = pytest.mark.slow


def test_version_0_is_served_like_any_other(
    start_server: Callable[..., Server], tmp_path: Path, png: bytes
) -> None:
    repo = tmp_path / "repo"
    publish_tiny(repo, "tiny").rename(repo / "tiny" / "0")
    write_models_config(repo, simple_config("tiny", policy="all {}"))
    server: Server = start_server(repo, grpc_port=0, args=("--poll-seconds", "0.2"))

    with server.client() as client:
        status = client.get("/v1/models/tiny").json()["model_version_status"]
        assert [(s["version"], s["state"]) for s in status] == [("0", "AVAILABLE")]
        b64 = base64.b64encode(png).decode()
        answer = client.post(
            "/v1/models/tiny/versions/0:predict",
            json={"signature_name": "predict_image_bytes", "instances": [{"b64": b64}]},
        )
        assert answer.status_code == 200 and len(answer.json()["predictions"][0]) == 3
        answer = client.post(
            "/v1/classify?version=0", content=png, headers={"content-type": "image/png"}
        )
        assert answer.status_code == 200 and answer.json()["version"] == 0

    with server.channel() as channel:
        request = predict_pb2.PredictRequest(
            model_spec=model_spec("tiny", 0, "predict_image_bytes")
        )
        request.inputs["image_bytes"].dtype = 7  # DT_STRING
        request.inputs["image_bytes"].tensor_shape.dim.add(size=1)
        request.inputs["image_bytes"].string_val.append(png)
        reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            request, timeout=30
        )
        # The answer names version 0, not "no version" (an unset wrapper).
        assert reply.model_spec.HasField("version") and reply.model_spec.version.value == 0
        status_stub = model_service_pb2_grpc.ModelServiceStub(channel)
        statuses = status_stub.GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec=model_spec("tiny", 0)),
            timeout=30,
        ).model_version_status
        assert [(s.version, s.state) for s in statuses] == [(0, 30)]  # AVAILABLE
        classifier = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
        reply = classifier.Classify(
            cnnserve_v1_pb2.ClassifyRequest(model="tiny", image=png, version=0), timeout=30
        )
        assert reply.version == 0
        with pytest.raises(grpc.RpcError) as missing:
            classifier.Classify(
                cnnserve_v1_pb2.ClassifyRequest(model="tiny", image=png, version=1), timeout=30
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]

    # The next version published beside 0 is 1; both served (policy all), newest first.
    assert publish_tiny(repo, "tiny", seed=1).name == "1"
    server.wait("/v1/models/tiny/versions/1/metadata")
    with server.client() as client:
        status = client.get("/v1/models/tiny").json()["model_version_status"]
        assert [s["version"] for s in status] == ["1", "0"]
        for version in (0, 1):
            answer = client.post(
                f"/v1/classify?version={version}",
                content=png,
                headers={"content-type": "image/png"},
            )
            assert answer.json()["version"] == version
