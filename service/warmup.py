"""TF Serving warmup records (``assets.extra/tf_serving_warmup_requests``) without TensorFlow.

The file is a TFRecord of ``tensorflow.serving.PredictionLog`` messages. Parsing them
with ``prediction_log_pb2`` would import all of TensorFlow (its TensorProto lives in the
``tensorflow`` package: ~4 s and ~600 MB per worker), which a LiteRT-served model never
needs otherwise. So this reads the few fields warm-up replays straight from the protobuf
wire format: PredictionLog.predict_log.request.{model_spec.signature_name, inputs}, and
each input TensorProto's dtype, shape and values. Field numbers are those of
tensorflow_serving/apis/{prediction_log,predict,model}.proto and
tensorflow/core/framework/{tensor,tensor_shape,types}.proto; tests/unit/test_registry.py
checks the result against ``tf.make_ndarray`` on records written by TensorFlow.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

SERVING_SIGNATURE = "serving_default"

# tensorflow.DataType enum → numpy, for the dtypes an image signature can take.
_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.float64),
    3: np.dtype(np.int32),
    4: np.dtype(np.uint8),
    5: np.dtype(np.int16),
    6: np.dtype(np.int8),
    9: np.dtype(np.int64),
    17: np.dtype(np.uint16),
}
# TensorProto's repeated value field for each dtype when tensor_content is not used:
# float_val=5 (fixed32), double_val=6 (fixed64), int_val=7, int64_val=10 (varints).
_VALUE_FIELD = {1: 5, 2: 6, 3: 7, 4: 7, 5: 7, 6: 7, 9: 10, 17: 7}

Field = tuple[int, int, int | bytes]  # (field number, wire type, varint or raw bytes)


class WarmupFormatError(ValueError):
    """A warmup file that is not a TFRecord of PredictionLog (TF Serving refuses it too)."""


def read_tfrecords(path: Path) -> Iterator[bytes]:
    """Records of a TFRecord file: u64 length, u32 crc, data, u32 crc (crcs not checked;
    a corrupt record fails to parse instead)."""
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise WarmupFormatError(f"{path}: truncated record header at byte {pos}")
        (length,) = struct.unpack_from("<Q", data, pos)
        start, end = pos + 12, pos + 12 + length
        if end + 4 > len(data):
            raise WarmupFormatError(f"{path}: truncated record at byte {pos}")
        yield data[start:end]
        pos = end + 4


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WarmupFormatError("malformed varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[Field]:
    """(number, wire type, value) of each field of one serialized message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):  # fixed64, fixed32
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 2:  # length-delimited: bytes, strings, messages, packed values
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise WarmupFormatError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise WarmupFormatError("truncated message")
        yield number, wire, value


def _sub(buf: bytes, number: int) -> list[bytes]:
    """Every length-delimited field ``number`` (sub-messages, strings) of a message."""
    return [v for n, w, v in _fields(buf) if n == number and w == 2 and isinstance(v, bytes)]


def _values(fields: list[Field], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """A repeated numeric field, packed or not, as a flat array of ``dtype``."""
    parts: list[npt.NDArray[Any]] = []
    for _, wire, value in fields:
        if isinstance(value, int):
            parts.append(np.array([value], dtype=np.uint64))
        elif dtype.kind == "f" and (wire == 2 or len(value) == dtype.itemsize):
            parts.append(np.frombuffer(value, dtype=dtype.newbyteorder("<")))
        else:  # packed varints
            ints, pos = [], 0
            while pos < len(value):
                item, pos = _varint(value, pos)
                ints.append(item)
            parts.append(np.array(ints, dtype=np.uint64))
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype)
    # Negative ints arrive as 64-bit two's complement varints: view, then narrow.
    return flat.view(np.int64).astype(dtype) if flat.dtype == np.uint64 else flat.astype(dtype)


def tensor_to_array(buf: bytes) -> npt.NDArray[Any]:
    """A serialized TensorProto → numpy array (what ``tf.make_ndarray`` returns)."""
    fields = list(_fields(buf))
    dtype_enum = next((v for n, w, v in fields if n == 1 and isinstance(v, int)), 0)
    if dtype_enum not in _DTYPES:
        raise WarmupFormatError(f"unsupported tensor dtype enum {dtype_enum}")
    dtype = _DTYPES[dtype_enum]
    shape_msg = next((v for n, w, v in fields if n == 2 and isinstance(v, bytes)), b"")
    shape = tuple(
        next((v for n, w, v in _fields(dim) if n == 1 and isinstance(v, int)), 0)
        for dim in _sub(shape_msg, 2)
    )
    size = int(np.prod(shape, dtype=np.int64))
    content = next((v for n, w, v in fields if n == 4 and isinstance(v, bytes)), None)
    if content is not None:
        flat = np.frombuffer(content, dtype=dtype.newbyteorder("<")).astype(dtype)
    else:
        flat = _values([f for f in fields if f[0] == _VALUE_FIELD[dtype_enum]], dtype)
        if flat.size == 1 and size > 1:  # one value stands for all, as in make_ndarray
            flat = np.full(size, flat[0], dtype)
    if flat.size != size:
        raise WarmupFormatError(f"tensor of shape {list(shape)} holds {flat.size} values")
    return flat.reshape(shape)


def warmup_inputs(path: Path) -> list[dict[str, npt.NDArray[Any]]]:
    """The named inputs of each serving_default predict request in a warmup file.

    Other signatures (the bytes one) and log types are skipped: the runtime replays only
    serving_default. A missing file means no records.
    """
    if not path.is_file():
        return []
    requests: list[dict[str, npt.NDArray[Any]]] = []
    for record in read_tfrecords(path):
        for predict_log in _sub(record, 6):  # PredictionLog.predict_log
            for request in _sub(predict_log, 1):  # PredictLog.request
                spec = next(iter(_sub(request, 1)), b"")  # PredictRequest.model_spec
                signature = next(iter(_sub(spec, 3)), b"").decode() or SERVING_SIGNATURE
                if signature != SERVING_SIGNATURE:
                    continue
                inputs = {}
                for entry in _sub(request, 2):  # map<string, TensorProto> entries
                    key = next(iter(_sub(entry, 1)), b"").decode()
                    inputs[key] = tensor_to_array(next(iter(_sub(entry, 2)), b""))
                requests.append(inputs)
    return requests
