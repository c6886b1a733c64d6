"""Signature definitions read from saved_model.pb, for model metadata (REST and gRPC)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from service.errors import ModelLoadError
from service.proto_gen.tensorflow.core.protobuf import saved_model_pb2
from service.proto_gen.tensorflow_serving.apis import get_model_metadata_pb2

# TF Serving hides the internal init signature from clients; so do we.
_INTERNAL = "__saved_model_init_op"


@lru_cache(maxsize=64)
def signature_def_map(version_dir: Path) -> get_model_metadata_pb2.SignatureDefMap:
    """The version's public signatures (cached: a published version never changes)."""
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read signatures of {version_dir}: {exc}") from None
    result = get_model_metadata_pb2.SignatureDefMap()
    for meta_graph in saved.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags or len(saved.meta_graphs) == 1:
            for key, sig in meta_graph.signature_def.items():
                if key != _INTERNAL:
                    result.signature_def[key].CopyFrom(sig)
            break
    return result
