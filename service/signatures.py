"""A version's SavedModel, read once when it loads: its signatures (for metadata, REST
and gRPC) and the checks that a corrupt folder fails its load instead of serving.

A version served from its LiteRT artifact never runs the SavedModel, so without these
checks a truncated ``saved_model.pb`` or a missing ``variables/`` would go unnoticed
until a metadata request (or never), though TF Serving, given the same folder, would
refuse it.
"""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf.message import DecodeError

from service.contract import SERVING_SIGNATURE
from service.errors import ModelLoadError
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
    _check_variables(meta_graph, version_dir)
    return result


def _check_variables(meta_graph: meta_graph_pb2.MetaGraphDef, version_dir: Path) -> None:
    """A graph with variables needs its checkpoint: the index and every data shard."""
    has_variables = any(n.HasField("variable") for n in meta_graph.object_graph_def.nodes) or any(
        n.op in _VARIABLE_OPS for n in meta_graph.graph_def.node
    )
    if not has_variables:
        return
    folder = version_dir / "variables"
    if not (folder / "variables.index").is_file():
        raise ModelLoadError(f"{version_dir}: the graph has variables but variables/ is missing")
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
