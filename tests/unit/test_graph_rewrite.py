"""The LiteRT rewrite that pools before normalizing: same answers, fewer values touched."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.runtimes.graph_rewrite import pool_before_affine
from service.training.architectures import NORMALIZATION

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


def _convert(model: Any) -> bytes:
    return bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def _ops(content: bytes) -> list[str]:
    from ai_edge_litert.interpreter import Interpreter

    return [op["op_name"] for op in Interpreter(model_content=content)._get_ops_details()]


def _run(content: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return np.asarray(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))


def _normalize() -> Any:
    return keras.layers.Rescaling(NORMALIZATION["scale"], offset=NORMALIZATION["offset"])


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def test_the_stem_pools_before_it_normalizes_with_the_same_answers() -> None:
    keras.utils.set_random_seed(0)
    inp = keras.Input((64, 64, 3), dtype="uint8")
    x = keras.layers.AveragePooling2D(4)(_normalize()(inp))
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    out = keras.layers.Dense(5, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    original = _convert(keras.Model(inp, out))
    assert _ops(original)[:4] == ["CAST", "MUL", "ADD", "AVERAGE_POOL_2D"]

    rewritten = pool_before_affine(original)

    assert _ops(rewritten)[:4] == ["CAST", "AVERAGE_POOL_2D", "MUL", "ADD"]
    x = _images(3)
    assert np.max(np.abs(_run(rewritten, x) - _run(original, x))) < 1e-5


def test_a_normalization_read_by_another_op_too_stays_where_it_is() -> None:
    inp = keras.Input((64, 64, 3), dtype="uint8")
    x = _normalize()(inp)
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.AveragePooling2D(4)(x))
    out = keras.layers.Concatenate()([pooled, keras.layers.GlobalMaxPooling2D()(x)])
    original = _convert(keras.Model(inp, out))

    assert pool_before_affine(original) is original


def test_a_graph_without_an_average_pool_is_returned_as_it_is() -> None:
    inp = keras.Input((64, 64, 3), dtype="uint8")
    original = _convert(keras.Model(inp, keras.layers.GlobalMaxPooling2D()(_normalize()(inp))))

    assert pool_before_affine(original) is original


def test_a_pool_with_a_fused_activation_is_not_moved() -> None:
    """ReLU(pool(a·x + b)) is not a·ReLU(pool(x)) + b: the converter fuses the ReLU
    into the pool, and such a pool keeps its place."""
    inp = keras.Input((64, 64, 3), dtype="uint8")
    x = keras.layers.ReLU()(keras.layers.AveragePooling2D(4)(_normalize()(inp)))
    original = _convert(keras.Model(inp, keras.layers.GlobalMaxPooling2D()(x)))
    assert _ops(original)[:4] == ["CAST", "MUL", "ADD", "AVERAGE_POOL_2D"]  # ReLU fused

    assert pool_before_affine(original) is original
