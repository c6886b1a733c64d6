"""A version's SavedModel, read once when it loads: its signatures (for metadata, REST
and gRPC) and the checks that a corrupt folder fails its load instead of serving.

A version served from its LiteRT artifact never runs the SavedModel, so without these
checks a truncated ``saved_model.pb`` or a missing ``variables/`` would go unnoticed
until a metadata request (or never), though TF Serving, given the same folder, would
refuse it.

A SignatureDef is also checked against the graph it describes: ``saved_model.pb`` keeps
the signatures (what metadata advertises, what TF Serving feeds) apart from the graph
and the concrete functions (what runs), and a folder whose two disagree loaded, then
advertised an input that every request following the metadata was refused for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from service.contract import SERVING_SIGNATURE
from service.errors import ModelLoadError
from service.proto_gen.tensorflow.core.framework import tensor_shape_pb2, types_pb2
from service.proto_gen.tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from service.proto_gen.tensorflow_serving.apis import get_model_metadata_pb2

_VARIABLE_OPS = frozenset({"VarHandleOp", "VariableV2", "Variable"})
_SHARD = re.compile(r"variables\.data-(\d{5})-of-(\d{5})")


def read_signatures(version_dir: Path) -> get_model_metadata_pb2.SignatureDefMap:
    """The version's signatures, every one as TF Serving's metadata lists them (its
    get_model_metadata_impl.cc copies the graph's map, a TF2 export's
    ``__saved_model_init_op`` too: it was left out here). ModelLoadError when
    ``saved_model.pb`` cannot be read or parsed, has no serving graph or no
    ``serving_default`` signature, or its graph has variables whose checkpoint files are
    missing."""
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    except (OSError, ValueError, DecodeError) as exc:
        raise ModelLoadError(f"cannot read {version_dir / 'saved_model.pb'}: {exc}") from None
    meta_graph = next(
        (m for m in saved.meta_graphs if "serve" in m.meta_info_def.tags),
        saved.meta_graphs[0] if len(saved.meta_graphs) == 1 else None,
    )
    if meta_graph is None:
        raise ModelLoadError(f"{version_dir}: saved_model.pb has no graph tagged 'serve'")
    result = get_model_metadata_pb2.SignatureDefMap(signature_def=meta_graph.signature_def)
    if SERVING_SIGNATURE not in result.signature_def:
        raise ModelLoadError(
            f"{version_dir}: saved_model.pb has no {SERVING_SIGNATURE!r} signature "
            f"(has {sorted(result.signature_def)})"
        )
    mismatch = graph_mismatch(meta_graph)
    if mismatch is not None:
        raise ModelLoadError(f"{version_dir}: {mismatch}")
    _check_variables(meta_graph, version_dir)
    return result


# The signature TF2 exports for its initializer: a NoOp, no tensors to compare.
_INIT_SIGNATURE = "__saved_model_init_op"


@dataclass(frozen=True)
class GraphTensor:
    """A tensor as the graph (or a loaded function) has it: a DataType and a shape,
    None for an unknown rank, None dimensions unknown."""

    dtype: int  # types_pb2.DataType
    shape: tuple[int | None, ...] | None


def signature_mismatch(
    name: str,
    signature: meta_graph_pb2.SignatureDef,
    inputs: Mapping[str, GraphTensor],
    outputs: Mapping[str, GraphTensor],
) -> str | None:
    """How the SignatureDef ``name`` (the proto's, what metadata advertises) differs from
    the ``inputs`` and ``outputs`` its graph takes and gives, or None when they agree:
    the same names, dtypes and ranks, and every dimension equal where both know it."""
    for kind, declared, actual, verb in (
        ("input", signature.inputs, inputs, "takes"),
        ("output", signature.outputs, outputs, "gives"),
    ):
        if set(declared) != set(actual):
            return (
                f"saved_model.pb's signature {name} says its {kind}s are {sorted(declared)} "
                f"but its graph {verb} {sorted(actual)}; re-export the model"
            )
        for key, info in declared.items():
            tensor = actual[key]
            if info.dtype != tensor.dtype or not _shapes_agree(info.tensor_shape, tensor.shape):
                return (
                    f"saved_model.pb's signature {name} says {kind} {key!r} is "
                    f"{_proto_text(info)} but its graph {verb} {_graph_text(tensor)}; "
                    "re-export the model"
                )
    return None


def _shapes_agree(
    declared: tensor_shape_pb2.TensorShapeProto, actual: tuple[int | None, ...] | None
) -> bool:
    if declared.unknown_rank or actual is None:
        return True
    if len(declared.dim) != len(actual):
        return False
    return all(
        d.size < 0 or a is None or d.size == a for d, a in zip(declared.dim, actual, strict=True)
    )


def _dtype_text(dtype: int, *, proto: bool) -> str:
    if dtype not in types_pb2.DataType.values():
        return f"dtype {dtype}"
    enum = str(types_pb2.DataType.Name(dtype))
    if proto:
        return enum
    # TensorFlow's names for the graph's side: uint8, float32, string...
    return _TF_NAMES.get(enum, enum.removeprefix("DT_").lower())


_TF_NAMES = {"DT_FLOAT": "float32", "DT_DOUBLE": "float64", "DT_HALF": "float16"}


def _proto_text(info: meta_graph_pb2.TensorInfo) -> str:
    shape = info.tensor_shape
    dims = (
        "<unknown rank>" if shape.unknown_rank else f"[{','.join(str(d.size) for d in shape.dim)}]"
    )
    return f"{_dtype_text(info.dtype, proto=True)} {dims}"


def _graph_text(tensor: GraphTensor) -> str:
    shape = tensor.shape
    dims = "<unknown rank>" if shape is None else f"[{','.join(str(d) for d in shape)}]"
    return f"{_dtype_text(tensor.dtype, proto=False)} {dims}"


def graph_mismatch(meta_graph: meta_graph_pb2.MetaGraphDef) -> str | None:
    """How a signature differs from the graph tensors it names (what TF Serving feeds
    and fetches), read from the proto alone, or None. A runtime that never runs the
    graph (LiteRT, from its artifact) sees it here; only what the graph's nodes state
    is compared: a node that records no dtype or shape agrees with anything."""
    nodes = {node.name: node for node in meta_graph.graph_def.node}
    # GraphDefs before version 21 wrote an unknown Placeholder shape as a scalar's.
    old = meta_graph.graph_def.versions.producer < 21
    for name, signature in sorted(meta_graph.signature_def.items()):
        if name == _INIT_SIGNATURE:
            continue
        found: list[dict[str, GraphTensor]] = []
        for infos in (signature.inputs, signature.outputs):
            tensors: dict[str, GraphTensor] = {}
            for key, info in infos.items():
                if info.WhichOneof("encoding") != "name":
                    tensors[key] = GraphTensor(info.dtype, None)  # sparse or composite
                    continue
                node_name, _, index = info.name.partition(":")
                output = int(index) if index.isdigit() else 0
                node = nodes.get(node_name)
                if node is None:
                    return (
                        f"saved_model.pb's signature {name} names tensor {info.name!r}, "
                        "which its graph does not have; re-export the model"
                    )
                tensors[key] = _node_tensor(node, output, info.dtype, old=old)
            found.append(tensors)
        mismatch = signature_mismatch(name, signature, found[0], found[1])
        if mismatch is not None:
            return mismatch
    return None


def _node_tensor(node: Any, index: int, default_dtype: int, *, old: bool) -> GraphTensor:
    """Output ``index`` of a graph node, as far as its attributes say."""
    attr = node.attr
    dtype = default_dtype
    if node.op in ("Placeholder", "PlaceholderWithDefault") and "dtype" in attr:
        dtype = attr["dtype"].type
    elif node.op in ("PartitionedCall", "StatefulPartitionedCall") and "Tout" in attr:
        types = attr["Tout"].list.type
        dtype = types[index] if index < len(types) else default_dtype
    elif node.op == "Identity" and "T" in attr:
        dtype = attr["T"].type
    shape: tensor_shape_pb2.TensorShapeProto | None = None
    if node.op == "Placeholder" and "shape" in attr:
        shape = attr["shape"].shape
        if old and not shape.dim:
            shape = None
    elif "_output_shapes" in attr and index < len(attr["_output_shapes"].list.shape):
        shape = attr["_output_shapes"].list.shape[index]
    if shape is None or shape.unknown_rank:
        return GraphTensor(dtype, None)
    return GraphTensor(dtype, tuple(None if d.size < 0 else int(d.size) for d in shape.dim))


def _check_variables(meta_graph: meta_graph_pb2.MetaGraphDef, version_dir: Path) -> None:
    """A graph with variables needs its checkpoint: the index and every data shard."""
    has_variables = any(n.HasField("variable") for n in meta_graph.object_graph_def.nodes) or any(
        n.op in _VARIABLE_OPS for n in meta_graph.graph_def.node
    )
    if not has_variables:
        return
    folder = version_dir / "variables"
    if not (folder / "variables.index").is_file():
        # Which: with the folder there, "variables/ is missing" sent people looking for a
        # folder they could see (an outside audit).
        missing = "variables/variables.index" if folder.is_dir() else "variables/"
        raise ModelLoadError(f"{version_dir}: the graph has variables but {missing} is missing")
    shards = [m for p in folder.iterdir() if (m := _SHARD.fullmatch(p.name)) and p.is_file()]
    totals = {int(m.group(2)) for m in shards}
    complete = len(totals) == 1 and {int(m.group(1)) for m in shards} == set(range(max(totals)))
    if not complete:
        raise ModelLoadError(
            f"{version_dir}: variables/ does not hold every variables.data shard "
            f"(found {sorted(m.group(0) for m in shards)})"
        )
    _check_shards_readable([folder / m.group(0) for m in shards], version_dir)


def _check_shards_readable(paths: list[Path], version_dir: Path) -> None:
    """Every data shard opens and reads, and they are not all empty (a graph with
    variables has weights somewhere): TF Serving, which restores them, would fail
    otherwise. Whether their bytes are the exported ones is the card's record to check
    (service.runtimes.card.damaged_variables); this costs one read per shard."""
    total = 0
    for path in paths:
        try:
            with open(path, "rb") as f:
                total += len(f.read(1))
        except OSError as exc:
            raise ModelLoadError(f"{version_dir}: cannot read {path.name}: {exc}") from None
    if total == 0:
        raise ModelLoadError(f"{version_dir}: the variables data shards are empty (truncated)")
