"""A worker serving LiteRT artifacts never loads TensorFlow; one that later needs it
(a version without an artifact, by hot reload) still imports and serves it.

"Loaded" is read from the server process itself: TensorFlow's native libraries
(``_pywrap_tensorflow_internal.so``, ``libtensorflow_framework.so``) are mapped into any
process that ran ``import tensorflow`` (or any ``tensorflow.core.*_pb2``, which runs it).
With one worker (the default in tests) the server process is the worker.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from service.publishing import publish_version
from service.runtimes import conversion
from tests.helpers.images import encode, gradient
from tests.helpers.models import publish_tiny, simple_config, write_models_config
from tests.helpers.server import Server, eventually

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PNG = encode(gradient(), "PNG")
TF_LIBRARIES = ("_pywrap_tensorflow_internal", "libtensorflow_framework")


def tensorflow_loaded(server: Server) -> bool:
    maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    return any(name in maps for name in TF_LIBRARIES)


def predict(channel: grpc.Channel, model: str, version: int, n: int = 2) -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.version.value = version
    pixels = np.random.default_rng(version).integers(0, 256, (n, 224, 224, 3), np.uint8)
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(pixels))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = stub.Predict(request, timeout=30)
    return tf.make_ndarray(response.outputs["probabilities"])


def metadata(channel: grpc.Channel, model: str, version: int) -> Any:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model
    request.model_spec.version.value = version
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    answer = stub.GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    answer.metadata["signature_def"].Unpack(signatures)
    return signatures.signature_def["serving_default"]


def available(channel: grpc.Channel, model: str) -> list[int]:
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    answer = stub.GetModelStatus(request, timeout=30)
    state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    return sorted(s.version for s in answer.model_version_status if s.state == state)


@pytest.fixture
def cache_env(tmp_path: Path) -> dict[str, str]:
    return {"CNNSERVE_CACHE_DIR": str(tmp_path / "cache")}


def test_the_committed_model_is_served_without_tensorflow(
    start_server: Any, cache_env: dict[str, str]
) -> None:
    server = start_server(ROOT / "model_repository", grpc_port=0, env=cache_env)
    with server.client() as client, server.channel() as channel:
        answer = client.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
        assert answer.status_code == 200, answer.text
        card = client.get("/demo/models/fashion_mnist/versions/1/card").json()
        assert card["serving"]["runtime"] == "litert"
        pixels = np.zeros((224, 224, 3), np.uint8).tolist()
        rest = client.post("/v1/models/fashion_mnist:predict", json={"instances": [pixels]})
        assert rest.status_code == 200, rest.text
        assert len(rest.json()["predictions"][0]) == 10
        assert predict(channel, "fashion_mnist", 1).shape == (2, 10)
        assert metadata(channel, "fashion_mnist", 1).inputs["image"].dtype == tf.uint8
        assert available(channel, "fashion_mnist") == [1]
    # Loading replayed the version's warmup records (read without TensorFlow too).
    assert not tensorflow_loaded(server), "the LiteRT worker mapped TensorFlow's libraries"


def _refuse_conversion(version_dir: Path, cache_dir: Path) -> None:
    """What a worker leaves in the cache when conversion does not verify: the version is
    then served by the TensorFlow runtime, without converting again."""
    folder = cache_dir / conversion.cache_key(version_dir)
    folder.mkdir(parents=True)
    record = {
        "verified": False,
        "max_abs_diff": 1.0,
        "tolerance": conversion.LITERT_TOLERANCE,
        "tensorflow": tf.__version__,
    }
    (folder / conversion.VERIFICATION).write_text(json.dumps(record))


def test_a_tensorflow_version_hot_reloaded_after_litert_ones_loads_and_serves(
    start_server: Any, cache_env: dict[str, str], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    publish_tiny(repo, "m", seed=0, with_litert=True)
    write_models_config(repo, simple_config("m", policy="all {}"))
    # Version 2 is built aside (a SavedModel only), so its conversion refusal can be
    # cached before the server can see it; then published by the usual rename.
    scratch = publish_tiny(tmp_path / "scratch", "m", seed=1)
    _refuse_conversion(scratch, Path(cache_env["CNNSERVE_CACHE_DIR"]))

    server = start_server(repo, grpc_port=0, env=cache_env, args=("--poll-seconds", "0.2"))
    with server.client() as client, server.channel() as channel:
        assert client.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
        assert predict(channel, "m", 1).shape == (2, 3)
        assert metadata(channel, "m", 1).outputs["probabilities"].dtype == tf.float32
        assert not tensorflow_loaded(server)

        publish_version(repo / "m", lambda tmp: shutil.copytree(scratch, tmp, dirs_exist_ok=True))
        eventually(lambda: available(channel, "m") == [1, 2])
        card = client.get("/demo/models/m/versions/2/card").json()
        assert card["serving"]["runtime"] == "tensorflow"
        assert tensorflow_loaded(server)

        # Both versions, both transports, after the real TensorFlow joined our protos.
        for version in (1, 2):
            got = predict(channel, "m", version)
            assert got.shape == (2, 3) and np.allclose(got.sum(axis=1), 1, atol=1e-4)
            assert metadata(channel, "m", version).inputs["image"].dtype == tf.uint8
            answer = client.post(
                "/v1/classify",
                params={"version": version},
                content=PNG,
                headers={"content-type": "image/png"},
            )
            assert answer.status_code == 200 and answer.json()["version"] == version
        # TF Serving's REST predict, answered by the TensorFlow runtime.
        pixels = np.zeros((224, 224, 3), np.uint8).tolist()
        rest = client.post("/v1/models/m/versions/2:predict", json={"instances": [pixels]})
        assert rest.status_code == 200 and len(rest.json()["predictions"][0]) == 3
