"""TF Serving's TensorProto/ModelSpec ↔ numpy, checked against TensorFlow's own converter."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import model_pb2

from service import tfserving_proto
from service.errors import InvalidRequest
from service.tfserving_proto import (
    declared_images,
    dtype_name,
    read_model_spec,
    to_ndarray,
    to_tensor_proto,
)


def typed(dtype: tf.DType, shape: tuple[int, ...], **values: Any) -> Any:
    return tensor_pb2.TensorProto(
        dtype=dtype.as_datatype_enum, tensor_shape=tf.TensorShape(shape).as_proto(), **values
    )


@pytest.mark.parametrize(
    "proto",
    [
        tf.make_tensor_proto(np.arange(24, dtype=np.uint8).reshape(1, 2, 4, 3)),
        tf.make_tensor_proto(np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)),
        tf.make_tensor_proto(np.arange(6, dtype=np.int64).reshape(3, 2)),
        typed(tf.uint8, (2, 2), int_val=[0, 1, 254, 255]),
        typed(tf.float32, (2, 3), float_val=[0.5]),  # one value fills the tensor
        typed(tf.int32, (2, 2)),  # no values: zeros
        typed(tf.float64, (3,), double_val=[1.0, 2.0, 3.0]),
        typed(tf.bool, (2,), bool_val=[True, False]),
        tf.make_tensor_proto([b"\x89PNG", b"\xff\xd8"]),
    ],
)
def test_to_ndarray_agrees_with_tensorflow(proto: Any) -> None:
    ours, theirs = to_ndarray(proto), tf.make_ndarray(proto)
    assert ours.shape == theirs.shape
    if theirs.dtype == object:
        assert list(ours) == list(theirs)
    else:
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(
    ("proto", "message"),
    [
        (typed(tf.uint8, (2,), int_val=[1, 300]), "range"),
        (typed(tf.float32, (2, 2), float_val=[1.0, 2.0]), "2 values for shape"),
        (typed(tf.uint8, (4,), tensor_content=b"abc"), "holds 3 bytes, 3 uint8 values"),
        # TF fills a tensor from one value only in the typed fields: one packed byte
        # answered as a whole constant image.
        (typed(tf.uint8, (1, 4, 4, 3), tensor_content=b"\x07"), "takes 48 values"),
        (typed(tf.float32, (2, 3), tensor_content=bytes(4)), "1 float32 values; shape"),
        (typed(tf.complex64, (1,), scomplex_val=[1.0, 0.0]), "DT_COMPLEX64"),
        # Found by fuzzing: uint8 travels in int_val (int32), so -1 can arrive.
        (typed(tf.uint8, (1,), int_val=[-1]), "range"),
        (typed(tf.uint16, (2,), int_val=[3, -5]), "range"),
        # Beyond what a request may carry (here 1,000 bytes), before any allocation:
        # one value filling 2**62, and no values at all in a shape numpy refuses.
        (typed(tf.uint8, (2**62,), int_val=[1]), "may carry"),
        (typed(tf.float32, (0, 2**62, 2**62)), "may carry"),
        # Fewer values than bytes, more bytes than the limit once filled: counted in
        # bytes (a string by its 8-byte reference), not values.
        (typed(tf.float64, (200,), double_val=[1.0]), "1,600 bytes as float64"),
        (typed(tf.float32, (300,)), "1,200 bytes as float32"),
        (typed(tf.string, (200,), string_val=[b"x"]), "1,600 bytes as object"),
        # Past numpy's 64 dimensions building the array raised ValueError (a 500).
        (typed(tf.uint8, (1,) * 65, int_val=[7]), "65 dimensions; at most 8"),
        (typed(tf.string, (1,) * 9, string_val=[b"x"]), "9 dimensions"),
    ],
)
def test_to_ndarray_refuses_malformed_tensors(proto: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        to_ndarray(proto, "image", max_bytes=1000)


@pytest.mark.parametrize(
    "proto",
    [
        typed(tf.float32, (2, 5), float_val=[x / 4 for x in range(10)]),
        typed(tf.uint8, (10,), int_val=list(range(250, 240, -1))),
        typed(tf.int64, (3, 3), int64_val=list(range(-4, 5))),
    ],
)
def test_typed_fields_longer_than_a_slice_are_read_whole(
    proto: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tfserving_proto, "SLICE_VALUES", 4)  # 10 values: 4 + 4 + 2
    np.testing.assert_array_equal(to_ndarray(proto), tf.make_ndarray(proto))
    with pytest.raises(InvalidRequest, match="range"):  # a bad value in the last slice
        to_ndarray(typed(tf.uint8, (10,), int_val=[1] * 9 + [300]))


def test_reading_a_long_typed_field_lets_other_threads_run() -> None:
    """np.fromiter over protobuf's repeated field holds the GIL to its end: a 38 MB
    Predict of float_val held the worker's event loop ~300 ms from the thread meant to
    spare it. Read in slices, another thread gets its turns meanwhile."""
    proto = typed(tf.float32, (4_000_000,), float_val=[0.5] * 4_000_000)
    gaps: list[float] = []
    done = threading.Event()

    def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        started = time.perf_counter()
        values = to_ndarray(proto)
        took = time.perf_counter() - started
    finally:
        done.set()
        thread.join()
    assert values.shape == (4_000_000,) and values[-1] == 0.5
    assert max(gaps) < took / 3, (max(gaps), took)  # held to the end: max(gaps) ~ took


@pytest.mark.parametrize(
    ("proto", "images"),
    [
        (typed(tf.string, (39_000_000,), string_val=[b"x"]), 39_000_000),  # each one a file
        (typed(tf.string, (2, 3)), 6),
        (typed(tf.float64, (262, 224, 224, 3), double_val=[1.0]), 262),
        (typed(tf.uint8, (224, 224, 3)), 0),  # no batch: its shape is refused, not counted
    ],
)
def test_declared_images_reads_the_shape_alone(proto: Any, images: int) -> None:
    assert declared_images(proto) == images


@pytest.mark.parametrize("packed", [True, False])
def test_to_tensor_proto_round_trips(packed: bool) -> None:
    for array in (
        np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), np.uint8),
        np.random.default_rng(0).random((4, 10), np.float32),
    ):
        proto = to_tensor_proto(array, packed=packed)
        assert bool(proto.tensor_content) == packed
        np.testing.assert_array_equal(tf.make_ndarray(proto), array)
        np.testing.assert_array_equal(to_ndarray(proto), array)


def test_model_spec_names_a_version_or_a_label() -> None:
    spec = model_pb2.ModelSpec(name="m", signature_name="s")
    assert read_model_spec(spec).version is None
    spec.version.value = 3
    ref = read_model_spec(spec)
    assert (ref.name, ref.version, ref.label, ref.signature_name) == ("m", 3, None, "s")
    spec.version_label = "canary"  # the oneof: setting the label clears the version
    assert (read_model_spec(spec).version, read_model_spec(spec).label) == (None, "canary")
    with pytest.raises(InvalidRequest, match="name"):
        read_model_spec(model_pb2.ModelSpec())
    spec = model_pb2.ModelSpec(name="m")
    spec.version.value = 0  # a set wrapper holding 0 names version 0, as in TF Serving
    assert read_model_spec(spec).version == 0
    spec.version.value = -1
    with pytest.raises(InvalidRequest, match="0 or more"):
        read_model_spec(spec)


def _varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def test_strings_packed_in_tensor_content_are_read_as_tensorflow_reads_them() -> None:
    """TensorFlow's own packed form of a string tensor (varint lengths, then the
    strings), which TF Serving reads: it was refused as "0 values for shape [3]"."""
    strings = [b"\x89PNG...", b"", b"x" * 300]
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING)
    proto.tensor_shape.dim.add(size=3)
    proto.tensor_content = b"".join(_varint(len(s)) for s in strings) + b"".join(strings)
    assert list(tf.io.parse_tensor(proto.SerializeToString(), tf.string).numpy()) == strings
    assert list(to_ndarray(proto, "image_bytes", 10**6)) == strings
    for broken in (proto.tensor_content[:-1], proto.tensor_content + b"x", b"\xff" * 8):
        proto.tensor_content = broken
        with pytest.raises(InvalidRequest, match="not 3 packed strings"):
            to_ndarray(proto, "image_bytes", 10**6)


def test_a_dtype_is_named_as_numpy_tf_or_the_number_sent() -> None:
    assert dtype_name(types_pb2.DT_FLOAT) == "float32"
    assert dtype_name(types_pb2.DT_STRING) == "DT_STRING"
    # A number no DataType has: the refusal said "has dtype ?".
    assert dtype_name(999) == "999 (no TensorFlow DataType)"
