"""TF Serving's protobuf messages ↔ numpy and plain values: the one converter module.

Both sides of TF Serving's gRPC API use it: the gateway's PredictionService/ModelService
servicers (parsing requests, building answers) and the tfserving backend (building the
requests it sends, reading the answers). The rest of the code sees numpy arrays and our
own types. Protobuf classes have no type stubs, so messages are typed ``Any`` here.

Tensors follow tensorflow/core/framework/tensor.proto: values come either packed in
``tensor_content`` (host byte order, what TF's C++ writes) or in the typed repeated field
of the dtype, where one value stands for a tensor filled with it and none for zeros.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt
from google.protobuf import text_format

from service.errors import InvalidRequest
from service.proto_gen.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from service.proto_gen.tensorflow_serving.apis import get_model_status_pb2, model_pb2

# DataType enum → (numpy dtype, TensorProto field holding its values when not packed).
_NUMERIC: dict[int, tuple[np.dtype[Any], str]] = {
    types_pb2.DT_FLOAT: (np.dtype(np.float32), "float_val"),
    types_pb2.DT_DOUBLE: (np.dtype(np.float64), "double_val"),
    types_pb2.DT_INT32: (np.dtype(np.int32), "int_val"),
    types_pb2.DT_UINT8: (np.dtype(np.uint8), "int_val"),
    types_pb2.DT_INT16: (np.dtype(np.int16), "int_val"),
    types_pb2.DT_INT8: (np.dtype(np.int8), "int_val"),
    types_pb2.DT_UINT16: (np.dtype(np.uint16), "int_val"),
    types_pb2.DT_INT64: (np.dtype(np.int64), "int64_val"),
    types_pb2.DT_UINT32: (np.dtype(np.uint32), "uint32_val"),
    types_pb2.DT_UINT64: (np.dtype(np.uint64), "uint64_val"),
    types_pb2.DT_BOOL: (np.dtype(np.bool_), "bool_val"),
}
_DTYPE_ENUM = {dtype: enum for enum, (dtype, _) in _NUMERIC.items()}
# More dimensions than any served input takes (images are 4-D, encoded images 1-D) and
# far fewer than numpy's 64, past which building the array raised a ValueError (a 500).
MAX_RANK = 8


def dtype_name(enum: int) -> str:
    """numpy's name for a DataType ("uint8", "float32"), else TF's ("DT_STRING"), else
    the number a client sent that names none ("999 (no TensorFlow DataType)")."""
    if enum in _NUMERIC:
        return _NUMERIC[enum][0].name
    if enum in types_pb2.DataType.values():
        return str(types_pb2.DataType.Name(enum))
    return f"{enum} (no TensorFlow DataType)"


def declared_images(proto: Any) -> int:
    """How many images a Predict input declares, read from its shape alone, before any
    value is: every string of a DT_STRING tensor is one encoded file, and a pixel tensor
    [N, H, W, 3] holds N. Other ranks count none here (the image check refuses them by
    their shape). TF's shorthand lets a 69-byte message declare 39 million files."""
    dims = [int(d.size) for d in proto.tensor_shape.dim]
    if any(d < 0 for d in dims):
        return 0  # refused by to_ndarray
    if proto.dtype == types_pb2.DT_STRING:
        return math.prod(dims)
    return dims[0] if len(dims) == 4 else 0


def _shape(proto: Any, what: str, max_bytes: int | None) -> tuple[int, ...]:
    if proto.tensor_shape.unknown_rank:
        raise InvalidRequest("a tensor has an unknown rank; give its shape")
    if len(proto.tensor_shape.dim) > MAX_RANK:
        raise InvalidRequest(
            f"{what} has {len(proto.tensor_shape.dim)} dimensions; at most {MAX_RANK} are "
            "taken (images are [batch, height, width, channels], encoded images [batch])"
        )
    dims = tuple(int(d.size) for d in proto.tensor_shape.dim)
    if any(d < 0 for d in dims):
        raise InvalidRequest(f"a tensor has a negative dimension in shape {list(dims)}")
    # Before anything is allocated: every value sent takes a byte at least, and a
    # dimension of 0 does not make the others harmless (numpy refuses the shape).
    if max_bytes is not None and (math.prod(dims) > max_bytes or max(dims, default=0) > max_bytes):
        raise InvalidRequest(
            f"{what} has shape {list(dims)}: more values, or a longer dimension, than the "
            f"{max_bytes:,} bytes a request may carry"
        )
    return dims


def _check_fill(shape: tuple[int, ...], dtype: np.dtype[Any], what: str, limit: int | None) -> None:
    """A tensor built from one value (or none) costs its whole size in memory, not what
    was sent: bounded in bytes (a string is an 8-byte reference), as the message is.
    Counting values let one double fill 315 MB, one string 39 million references."""
    need = math.prod(shape) * dtype.itemsize
    if limit is not None and need > limit:
        raise InvalidRequest(
            f"{what} has shape {list(shape)}: filled from one value or none, it takes "
            f"{need:,} bytes as {dtype}, more than the {limit:,} bytes a request may carry"
        )


def _fill(
    values: npt.NDArray[Any], shape: tuple[int, ...], what: str, limit: int | None
) -> npt.NDArray[Any]:
    size = math.prod(shape)
    if len(values) == size:
        return values.reshape(shape)
    if len(values) == 1:  # TF's shorthand: one value fills the tensor
        _check_fill(shape, values.dtype, what, limit)
        return np.full(shape, values[0], dtype=values.dtype)
    raise InvalidRequest(f"{what}: {len(values)} values for shape {list(shape)} ({size} values)")


def _unpacked(
    content: bytes, dtype: np.dtype[Any], shape: tuple[int, ...], what: str
) -> npt.NDArray[Any]:
    """tensor_content's values: all of them, exactly. TF reads one value as filling the
    tensor only in the typed fields, and refuses packed bytes of another size (one byte
    filled a whole [1,224,224,3] image here)."""
    size = math.prod(shape)
    if len(content) % dtype.itemsize:
        raise InvalidRequest(f"{what}: tensor_content is not a whole number of {dtype}")
    count = len(content) // dtype.itemsize
    if count != size:
        raise InvalidRequest(
            f"{what}: tensor_content holds {len(content):,} bytes, {count:,} {dtype} values; "
            f"shape {list(shape)} takes {size:,} values ({size * dtype.itemsize:,} bytes)"
        )
    return np.frombuffer(content, dtype=dtype).reshape(shape)


def _string_list(content: bytes, count: int, what: str) -> list[bytes]:
    """A DT_STRING tensor's strings packed as TensorFlow packs them in tensor_content
    (Tensor::AsProtoTensorContent; TF Serving reads them): ``count`` varint lengths, then
    the strings one after another, nothing left over."""
    lengths, at = [], 0
    for _ in range(count):
        length = shift = 0
        while True:
            if at >= len(content) or shift > 28:
                raise InvalidRequest(f"{what}: tensor_content is not {count} packed strings")
            byte = content[at]
            at += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        lengths.append(length)
    if at + sum(lengths) != len(content):
        raise InvalidRequest(f"{what}: tensor_content is not {count} packed strings")
    strings = []
    for length in lengths:
        strings.append(bytes(content[at : at + length]))
        at += length
    return strings


def to_ndarray(
    proto: Any, name: str = "tensor", max_bytes: int | None = None, *, role: str = "input"
) -> npt.NDArray[Any]:
    """The numpy array of a TensorProto; DT_STRING gives an object array of bytes.
    ``max_bytes`` bounds what it may allocate (a client's tensor; None for a trusted one);
    ``role`` names the tensor in errors (a backend's answer is an "output")."""
    what = f"{role} {name!r}"
    shape = _shape(proto, what, max_bytes)
    if proto.dtype == types_pb2.DT_STRING:
        values = (
            _string_list(proto.tensor_content, math.prod(shape), what)
            if proto.tensor_content
            else list(proto.string_val)
        )
        strings = np.empty(len(values), dtype=object)
        strings[:] = values
        return _fill(strings, shape, what, max_bytes)
    if proto.dtype not in _NUMERIC:
        others = set(_NUMERIC) - {types_pb2.DT_UINT8, types_pb2.DT_BOOL}  # bools: no pixels
        supported = ", ".join(sorted(types_pb2.DataType.Name(e) for e in others))
        raise InvalidRequest(
            f"{what} has dtype {dtype_name(proto.dtype)}; send DT_UINT8 images, another "
            f"numeric type ({supported}) or DT_STRING encoded images"
        )
    dtype, field = _NUMERIC[proto.dtype]
    if proto.tensor_content:
        return _unpacked(proto.tensor_content, dtype, shape, what)
    raw = getattr(proto, field)
    if not len(raw):
        _check_fill(shape, dtype, what, max_bytes)
        return np.zeros(shape, dtype=dtype)
    if dtype.kind in "iu":
        # Through int64 with a range check: numpy would wrap 300 into a uint8 silently.
        # uint8 and uint16 travel in int_val (int32, so -1 can arrive); only uint64's own
        # field may hold values past int64.
        wide_type = np.uint64 if dtype == np.uint64 else np.int64
        wide = _from_repeated(raw, wide_type)
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidRequest(f"{what}: values outside the {dtype} range {info.min}..{info.max}")
        return _fill(wide.astype(dtype), shape, what, max_bytes)
    return _fill(_from_repeated(raw, dtype), shape, what, max_bytes)


# np.fromiter over a protobuf repeated field is one C loop that holds the GIL from start
# to end: 9.6M float_val (a 38 MB Predict, under the message limit) held it ~300 ms, in
# a thread meant to keep the conversion off the event loop, and the worker's health
# checks waited that long (an outside audit). Read in slices, the loop's thread gets
# the GIL between them (each ~1 ms).
SLICE_VALUES = 1 << 15


def _from_repeated(raw: Any, dtype: Any) -> npt.NDArray[Any]:
    count = len(raw)
    if count <= SLICE_VALUES:
        return np.fromiter(raw, dtype=dtype, count=count)
    values = np.empty(count, dtype=dtype)
    walk = iter(raw)  # each slice takes its count from where the last stopped
    for start in range(0, count, SLICE_VALUES):
        stop = min(start + SLICE_VALUES, count)
        values[start:stop] = np.fromiter(walk, dtype=dtype, count=stop - start)
    return values


def to_tensor_proto(array: npt.NDArray[Any], *, packed: bool) -> Any:
    """A TensorProto of a numeric array: ``packed`` puts the bytes in tensor_content (one
    copy, what we send to TF Serving); otherwise the typed field, as TF Serving's Predict
    answers by default, so clients reading ``float_val`` directly work too."""
    dtype = array.dtype
    if dtype not in _DTYPE_ENUM:
        raise TypeError(f"no TensorProto dtype for {dtype}")
    enum = _DTYPE_ENUM[dtype]
    proto = tensor_pb2.TensorProto(
        dtype=cast(types_pb2.DataType, enum),  # the pyi types enums as their wrapper
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in array.shape]
        ),
    )
    if packed:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
    else:
        getattr(proto, _NUMERIC[enum][1]).extend(array.ravel().tolist())
    return proto


# --- model_spec ----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """What a ModelSpec names: model, and a version number or label (or neither)."""

    name: str | None
    version: int | None = None
    label: str | None = None
    signature_name: str = ""


def read_model_spec(spec: Any, *, name_required: bool = True) -> ModelRef:
    if name_required and not spec.name:
        raise InvalidRequest("model_spec.name is required")
    choice = spec.WhichOneof("version_choice")
    version = int(spec.version.value) if choice == "version" else None
    if version is not None and version < 0:
        raise InvalidRequest(f"model_spec.version must be 0 or more, got {version}")
    label = str(spec.version_label) if choice == "version_label" else None
    return ModelRef(spec.name or None, version, label, str(spec.signature_name))


def model_spec(name: str, version: int | None = None, signature_name: str = "") -> Any:
    spec = model_pb2.ModelSpec(name=name, signature_name=signature_name)
    if version is not None:
        spec.version.value = version
    return spec


# --- GetModelStatus ------------------------------------------------------------------


class VersionStatusLike(Protocol):
    """What a status row needs (the registry's VersionStatus; this module sits below it)."""

    @property
    def version(self) -> int: ...
    @property
    def state(self) -> int: ...
    @property
    def error_code(self) -> int: ...
    @property
    def error_message(self) -> str: ...


def status_response(statuses: Iterable[VersionStatusLike]) -> Any:
    """GetModelStatusResponse; error codes are gRPC numbers, which tensorflow.error.Code
    shares."""
    response = get_model_status_pb2.GetModelStatusResponse()
    for s in statuses:
        row = response.model_version_status.add(version=s.version, state=int(s.state))
        row.status.error_code = s.error_code
        row.status.error_message = s.error_message
    return response


def available_versions(response: Any) -> list[int]:
    """Versions a GetModelStatusResponse reports AVAILABLE (a negative one is no version
    number: it was served as version -5, and a request naming none got a 400 for it)."""
    return _versions_in(response, get_model_status_pb2.ModelVersionStatus.AVAILABLE)


def loading_versions(response: Any) -> list[int]:
    """Versions a GetModelStatusResponse reports on their way to AVAILABLE (START or
    LOADING): a model whose every version is loading there is not ready, not missing."""
    state = get_model_status_pb2.ModelVersionStatus
    return _versions_in(response, state.START, state.LOADING)


def _versions_in(response: Any, *states: int) -> list[int]:
    return sorted(
        int(s.version)
        for s in response.model_version_status
        if s.state in states and s.version >= 0
    )


def tensor_dims(info: Any) -> tuple[int | None, ...]:
    """Shape of a TensorInfo, None for unknown (-1) dimensions."""
    return tuple(None if d.size < 0 else int(d.size) for d in info.tensor_shape.dim)


def config_text(config: Any) -> str:
    """A ModelServerConfig as models.config text (text protobuf)."""
    return str(text_format.MessageToString(config))
