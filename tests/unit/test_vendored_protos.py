"""service.proto_gen's TF-free copies of TF Serving's protos (proto/vendor_tf.py).

Each order of imports runs in a fresh interpreter: which module registers a proto file
first is the point, and the test process has usually imported TensorFlow already.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

OURS_THEN_TENSORFLOW = """
import sys
from service.proto_gen.tensorflow.core.framework import tensor_pb2, types_pb2
from service.proto_gen.tensorflow.core.protobuf import saved_model_pb2
from service.proto_gen.tensorflow_serving.apis import (
    get_model_metadata_pb2, model_service_pb2_grpc, predict_pb2, prediction_log_pb2,
    prediction_service_pb2_grpc,
)
assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules), \\
    sorted(m for m in sys.modules if m.startswith("tensorflow"))
# Same proto file names and packages as TensorFlow's own.
assert tensor_pb2.DESCRIPTOR.name == "tensorflow/core/framework/tensor.proto"
assert tensor_pb2.TensorProto.DESCRIPTOR.full_name == "tensorflow.TensorProto"
assert predict_pb2.PredictRequest.DESCRIPTOR.full_name == "tensorflow.serving.PredictRequest"

ours = tensor_pb2.TensorProto(dtype=types_pb2.DT_UINT8, tensor_content=bytes(range(6)))
ours.tensor_shape.dim.add(size=2)
ours.tensor_shape.dim.add(size=3)
wire = ours.SerializeToString()

import numpy as np
import tensorflow as tf  # the real thing, after ours registered the same files
from tensorflow.core.framework import tensor_pb2 as tf_tensor_pb2
from tensorflow.core.protobuf import saved_model_pb2 as tf_saved_model_pb2
from tensorflow_serving.apis import predict_pb2 as tf_predict_pb2

theirs = tf.make_tensor_proto(np.arange(6, dtype=np.uint8).reshape(2, 3))
assert theirs.SerializeToString() == wire, (theirs, ours)
np.testing.assert_array_equal(tf.make_ndarray(ours), np.arange(6).reshape(2, 3))
assert tensor_pb2.TensorProto.FromString(theirs.SerializeToString()) == ours
# One descriptor pool, one class per message: either module's messages are the other's.
assert tf_tensor_pb2.TensorProto is tensor_pb2.TensorProto
assert tf_predict_pb2.PredictRequest is predict_pb2.PredictRequest
assert tf_saved_model_pb2.SavedModel is saved_model_pb2.SavedModel
request = tf_predict_pb2.PredictRequest()
request.inputs["image"].CopyFrom(ours)
assert predict_pb2.PredictRequest.FromString(request.SerializeToString()) == request
# And TensorFlow itself still works.
assert float(tf.reduce_sum(tf.constant([1.0, 2.0]))) == 3.0
print("ok")
"""

TENSORFLOW_THEN_OURS = """
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2 as tf_predict_pb2
from service.proto_gen.tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
assert tf_predict_pb2.PredictRequest is predict_pb2.PredictRequest
print("ok")
"""


@pytest.mark.parametrize(
    "script", [OURS_THEN_TENSORFLOW, TENSORFLOW_THEN_OURS], ids=["ours-first", "tf-first"]
)
def test_vendored_protos_and_tensorflow_share_one_pool(script: str) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_the_service_imports_tf_serving_protos_only_from_proto_gen() -> None:
    """The official modules live inside the tensorflow package (tensorflow.core.*) or
    import from it: one import of them in the gateway loads all of TensorFlow."""
    found = []
    for path in sorted((ROOT / "service").rglob("*.py")):
        if "proto_gen" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith(("tensorflow_serving", "tensorflow.core")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not found, "import service.proto_gen.<same path> instead:\n" + "\n".join(found)
