"""A SavedModel whose SignatureDef disagrees with its graph is refused at load.

``saved_model.pb`` keeps each signature (the SignatureDef: what metadata advertises and
what TF Serving feeds) apart from the graph and the concrete function that run. A version
whose SignatureDef alone was edited loaded AVAILABLE, /v1/classify answered from the
graph, and its metadata advertised an input (DT_FLOAT, or [-1,10]) that every :predict
following it was refused for. Such a folder is corrupt: every runtime refuses it with a
message that names the signature, the tensor, what the SignatureDef says and what the
graph takes, and the version goes END while the one before keeps serving.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from service.contract import SERVING_SIGNATURE
from service.errors import ModelLoadError
from service.proto_gen.tensorflow.core.framework import types_pb2
from service.proto_gen.tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from service.registry import Registry, VersionState
from service.runtimes import create_runtime
from service.runtimes.tensorflow import TensorFlowRuntime
from service.signatures import GraphTensor, read_signatures, signature_mismatch
from tests.helpers.core import run_with, settings
from tests.helpers.models import publish_tiny, simple_config, write_models_config

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"

# --- helpers -------------------------------------------------------------------------

Edit = Callable[[meta_graph_pb2.MetaGraphDef], None]


def _edit_saved_model(folder: Path, edit: Edit) -> None:
    """Rewrite ``folder``'s saved_model.pb with ``edit`` applied to its graph."""
    pb = folder / "saved_model.pb"
    saved = saved_model_pb2.SavedModel.FromString(pb.read_bytes())
    edit(saved.meta_graphs[0])
    pb.write_bytes(saved.SerializeToString())


def _image(meta_graph: meta_graph_pb2.MetaGraphDef) -> meta_graph_pb2.TensorInfo:
    image: meta_graph_pb2.TensorInfo = meta_graph.signature_def[SERVING_SIGNATURE].inputs["image"]
    return image


def _set_dims(info: meta_graph_pb2.TensorInfo, *dims: int) -> None:
    del info.tensor_shape.dim[:]
    for size in dims:
        info.tensor_shape.dim.add(size=size)


def image_shape_10(meta_graph: meta_graph_pb2.MetaGraphDef) -> None:
    _set_dims(_image(meta_graph), -1, 10)


def image_dtype_float(meta_graph: meta_graph_pb2.MetaGraphDef) -> None:
    _image(meta_graph).dtype = types_pb2.DT_FLOAT


def image_renamed(meta_graph: meta_graph_pb2.MetaGraphDef) -> None:
    inputs = meta_graph.signature_def[SERVING_SIGNATURE].inputs
    inputs["pixels"].CopyFrom(inputs["image"])
    del inputs["image"]


def classes_5(meta_graph: meta_graph_pb2.MetaGraphDef) -> None:
    _set_dims(meta_graph.signature_def[SERVING_SIGNATURE].outputs["probabilities"], -1, 5)


def image_tensor_missing(meta_graph: meta_graph_pb2.MetaGraphDef) -> None:
    _image(meta_graph).name = "no_such_node:0"


def image_dtype_float_in_the_graph_too(meta_graph: meta_graph_pb2.MetaGraphDef) -> None:
    """The SignatureDef and the graph's placeholder both say float; the function that
    tf.saved_model.load builds (from the object graph) still takes uint8."""
    image_dtype_float(meta_graph)
    node_name = _image(meta_graph).name.partition(":")[0]
    (node,) = (n for n in meta_graph.graph_def.node if n.name == node_name)
    node.attr["dtype"].type = types_pb2.DT_FLOAT


IMAGE_FLOAT = (
    "saved_model.pb's signature serving_default says input 'image' is DT_FLOAT "
    "[-1,224,224,3] but its graph takes uint8 [None,224,224,3]; re-export the model"
)
# What each edit is refused with, whatever the runtime.
REFUSALS: dict[str, tuple[Edit, str]] = {
    "image shape [-1,10]": (
        image_shape_10,
        "saved_model.pb's signature serving_default says input 'image' is DT_UINT8 "
        "[-1,10] but its graph takes uint8 [None,224,224,3]; re-export the model",
    ),
    "image dtype DT_FLOAT": (image_dtype_float, IMAGE_FLOAT),
    "input renamed": (
        image_renamed,
        "saved_model.pb's signature serving_default says its inputs are ['pixels'] "
        "but its graph takes ['image']; re-export the model",
    ),
    "output of 5 classes": (
        classes_5,
        "saved_model.pb's signature serving_default says output 'probabilities' is "
        "DT_FLOAT [-1,5] but its graph gives float32 [None,3]; re-export the model",
    ),
    "input tensor not in the graph": (
        image_tensor_missing,
        "saved_model.pb's signature serving_default names tensor 'no_such_node:0', "
        "which its graph does not have; re-export the model",
    ),
}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny cnnserve export whose card records a verified model.tflite (production's
    case: ``auto`` serves the artifact)."""
    return publish_tiny(tmp_path_factory.mktemp("signatures") / "repo", "m", with_litert=True)


def _edited_copy(shipped: Path, tmp_path: Path, edit: Edit) -> Path:
    folder = tmp_path / "m" / "1"
    shutil.copytree(shipped, folder)
    _edit_saved_model(folder, edit)
    return folder


# --- the comparison ------------------------------------------------------------------


def _signature(dtype: int, *dims: int, unknown_rank: bool = False) -> meta_graph_pb2.SignatureDef:
    signature = meta_graph_pb2.SignatureDef()
    image = signature.inputs["image"]
    image.name, image.dtype = "serving_default_image:0", dtype
    if unknown_rank:
        image.tensor_shape.unknown_rank = True
    _set_dims(image, *dims)
    out = signature.outputs["probabilities"]
    out.name, out.dtype = "StatefulPartitionedCall:0", types_pb2.DT_FLOAT
    _set_dims(out, -1, 10)
    return signature


OUTPUTS = {"probabilities": GraphTensor(types_pb2.DT_FLOAT, (None, 10))}


@pytest.mark.parametrize(
    ("declared", "graph"),
    [
        ((-1, 224, 224, 3), (None, 224, 224, 3)),
        ((1, 224, 224, 3), (None, 224, 224, 3)),  # a known dim against an unknown one
        ((-1, -1, -1, 3), (None, 224, 224, 3)),
        ((-1, 224, 224, 3), (8, 224, 224, 3)),
        ((-1, 224, 224, 3), None),  # the graph does not know the rank
    ],
)
def test_unknown_dimensions_agree_with_any(
    declared: tuple[int, ...], graph: tuple[int | None, ...] | None
) -> None:
    signature = _signature(types_pb2.DT_UINT8, *declared)
    inputs = {"image": GraphTensor(types_pb2.DT_UINT8, graph)}
    assert signature_mismatch(SERVING_SIGNATURE, signature, inputs, OUTPUTS) is None
    unknown = _signature(types_pb2.DT_UINT8, unknown_rank=True)
    assert signature_mismatch(SERVING_SIGNATURE, unknown, inputs, OUTPUTS) is None


@pytest.mark.parametrize(
    ("dtype", "declared", "graph", "said"),
    [
        (types_pb2.DT_FLOAT, (-1, 224, 224, 3), (None, 224, 224, 3), "DT_FLOAT [-1,224,224,3]"),
        (types_pb2.DT_UINT8, (-1, 10), (None, 224, 224, 3), "DT_UINT8 [-1,10]"),
        (types_pb2.DT_UINT8, (-1, 28, 28, 3), (None, 224, 224, 3), "DT_UINT8 [-1,28,28,3]"),
        (types_pb2.DT_UINT8, (2, 224, 224, 3), (1, 224, 224, 3), "DT_UINT8 [2,224,224,3]"),
    ],
)
def test_a_known_difference_is_named(
    dtype: int, declared: tuple[int, ...], graph: tuple[int | None, ...], said: str
) -> None:
    signature = _signature(dtype, *declared)
    inputs = {"image": GraphTensor(types_pb2.DT_UINT8, graph)}
    takes = f"uint8 [{','.join(str(d) for d in graph)}]"
    assert signature_mismatch(SERVING_SIGNATURE, signature, inputs, OUTPUTS) == (
        f"saved_model.pb's signature serving_default says input 'image' is {said} but its "
        f"graph takes {takes}; re-export the model"
    )


# --- real SavedModels ----------------------------------------------------------------


def test_the_repositorys_models_agree_with_their_graphs() -> None:
    """Every committed version passes the proto-only check (no TensorFlow)."""
    versions = [p for p in REPOSITORY.glob("*/*") if (p / "saved_model.pb").is_file()]
    assert versions
    for version in versions:
        signatures = read_signatures(version)
        assert SERVING_SIGNATURE in signatures.signature_def


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tensorflow", "litert", "auto"])
def test_intact_models_still_load(kind: str, shipped: Path, tmp_path: Path) -> None:
    for folder in (shipped, REPOSITORY / "fashion_mnist" / "1"):
        rt = create_runtime(kind, folder, cache_dir=tmp_path / "cache", threads=1)
        info = rt.load()
        assert (info.input.dtype, info.input_name) == ("uint8", "image")
        rt.unload()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tensorflow", "litert", "auto"])
@pytest.mark.parametrize("how", list(REFUSALS))
def test_a_signature_def_that_disagrees_with_its_graph_is_refused(
    how: str, kind: str, shipped: Path, tmp_path: Path
) -> None:
    edit, message = REFUSALS[how]
    folder = _edited_copy(shipped, tmp_path, edit)
    rt = create_runtime(kind, folder, cache_dir=tmp_path / "cache", threads=1)
    with pytest.raises(ModelLoadError, match=re.escape(f"{folder}: {message}")):
        rt.load()
    assert not rt.ready
    # Nothing converted from it was cached to serve later.
    assert not list((tmp_path / "cache").glob("*/model.tflite"))


@pytest.mark.slow
def test_the_loaded_function_is_compared_too(shipped: Path, tmp_path: Path) -> None:
    """SignatureDef and graph placeholder edited alike: the proto agrees with itself, but
    tf.saved_model.load serves the object graph's function, which takes uint8."""
    folder = _edited_copy(shipped, tmp_path, image_dtype_float_in_the_graph_too)
    read_signatures(folder)  # the proto-only check cannot see it
    rt = TensorFlowRuntime(folder, threads=1)
    with pytest.raises(ModelLoadError, match=re.escape(f"{folder}: {IMAGE_FLOAT}")):
        rt.load()
    assert not rt.ready


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["tensorflow", "auto"])
def test_the_registry_ends_the_version_and_keeps_serving_the_one_before(
    runtime: str, shipped: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(shipped, repo / "m" / "1")
    write_models_config(repo, simple_config("m"))
    registry = Registry(settings(repo, tmp_path).model_copy(update={"runtime": runtime}))

    async def scenario() -> None:
        await registry.start()
        assert registry.resolve("m").version == 1
        v2 = repo / "m" / "2"
        shutil.copytree(shipped, v2)
        _edit_saved_model(v2, image_dtype_float)
        await registry.poll_once()
        status = registry.statuses("m", version=2)[0]
        assert status.state == VersionState.END
        assert IMAGE_FLOAT in status.error_message
        served = registry.resolve("m")
        assert served.version == 1
        image = served.runtime.signature_defs().signature_def[SERVING_SIGNATURE].inputs["image"]
        assert image.dtype == types_pb2.DT_UINT8

    run_with(registry, scenario)
