"""Generate service/proto_gen/{tensorflow,tensorflow_serving}: TF Serving's API protos
(and the TensorFlow core protos they import) as modules that do not import TensorFlow.

Why: every ``tensorflow.core.*_pb2`` module lives inside the ``tensorflow`` package, so
importing one (``tensorflow_serving.apis.predict_pb2`` does) runs ``tensorflow/__init__``
and loads all of TensorFlow (~0.5 GB, ~2.5 s) into a gateway worker that serves a LiteRT
artifact and never needs it. A TF-free copy of the protos fixes that without tricks on
``sys.modules``, which a later real ``import tensorflow`` in the same process (a version
that needs the TensorFlow runtime, conversion) could trip over.

How: the descriptors are not re-derived from .proto sources (TensorFlow's wheel does not
ship them); they are read, without importing anything, from the serialized
FileDescriptorProto that the installed ``_pb2.py`` files (tensorflow==2.21.*,
tensorflow-serving-api==2.21.*, pinned in pyproject.toml) hand to the descriptor pool.
protoc regenerates Python code from that descriptor set, and only the module paths are
moved under ``service.proto_gen``: the proto *file names* and *packages* stay TF's own
(``tensorflow/core/framework/tensor.proto``, ``tensorflow.TensorProto``). So:

- the wire format is TF Serving's by construction (same descriptors);
- the default descriptor pool accepts TensorFlow's identical files when real TensorFlow
  is imported later in the same process (an identical re-registration is a no-op), and
  protobuf's upb backend then hands both modules the same message classes;
- ``make proto-check`` regenerates and diffs, so an upgrade of the pinned TF packages
  that changes a proto shows up as a stale file.

Usage (``make proto`` runs it): ``python proto/vendor_tf.py OUT_DIR``; files are written
under OUT_DIR/service/proto_gen/.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

# What the gateway worker uses; everything these import comes along.
ROOTS = (
    "tensorflow_serving/apis/prediction_service.proto",
    "tensorflow_serving/apis/model_service.proto",
    "tensorflow_serving/apis/prediction_log.proto",
    "tensorflow/core/protobuf/saved_model.proto",
)
PREFIX = "service.proto_gen"
SITE = Path(sysconfig.get_paths()["purelib"])
INIT = '"""Code generated from proto/ by `make proto`; never edit by hand."""\n'


def _serialized_file(module_file: Path) -> bytes:
    """The FileDescriptorProto bytes a _pb2.py module adds to the pool (not imported)."""
    for node in ast.walk(ast.parse(module_file.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, bytes)
        ):
            return node.args[0].value
    raise SystemExit(f"{module_file}: no AddSerializedFile(b'...') found")


def _module_files(module_file: Path) -> list[Path]:
    """The _pb2 modules a _pb2.py module imports, as files (their path need not follow
    the proto file name: xla/tsl/... lives in tensorflow/compiler/xla/tsl/...)."""
    found = []
    for node in ast.parse(module_file.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if alias.name.endswith("_pb2"):
                    found.append(SITE / node.module.replace(".", "/") / f"{alias.name}.py")
    return found


def descriptor_set() -> tuple[descriptor_pb2.FileDescriptorSet, list[str]]:
    """ROOTS and their imports, dependencies first; and the names to generate."""
    by_name: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    ordered: list[descriptor_pb2.FileDescriptorProto] = []

    def visit(module_file: Path) -> str:
        proto = descriptor_pb2.FileDescriptorProto()
        if module_file.is_relative_to(SITE / "google"):  # protobuf's own: cheap to import
            module = importlib.import_module(
                ".".join(module_file.relative_to(SITE).with_suffix("").parts)
            )
            module.DESCRIPTOR.CopyToProto(proto)
        else:
            proto.ParseFromString(_serialized_file(module_file))
        if proto.name not in by_name:
            by_name[proto.name] = proto
            imported = {visit(f) for f in _module_files(module_file)}
            missing = set(proto.dependency) - imported
            if missing:
                raise SystemExit(f"{module_file}: imports no module for {sorted(missing)}")
            ordered.append(proto)
        return proto.name

    for root in ROOTS:
        visit(SITE / (root.removesuffix(".proto") + "_pb2.py"))
    result = descriptor_pb2.FileDescriptorSet(file=ordered)
    return result, [f.name for f in ordered if not f.name.startswith("google/protobuf/")]


def _rewrite(text: str, packages: set[str]) -> str:
    """Module paths under service.proto_gen; proto file names and packages untouched."""
    alternatives = "|".join(sorted(packages))
    text = re.sub(rf"^(from|import) ({alternatives})\.", rf"\1 {PREFIX}.\2.", text, flags=re.M)
    return re.sub(
        rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')({alternatives})\.",
        rf"\1{PREFIX}.\2.",
        text,
    )


def generate(out: Path) -> None:
    files, names = descriptor_set()
    packages = {name.split("/")[0] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        set_path = Path(tmp) / "set.pb"
        set_path.write_bytes(files.SerializeToString())
        gen = Path(tmp) / "gen"
        gen.mkdir()
        with_services = [f.name for f in files.file if f.service and f.name in ROOTS]
        protoc = [sys.executable, "-m", "grpc_tools.protoc", f"--descriptor_set_in={set_path}"]
        subprocess.run([*protoc, f"--python_out={gen}", f"--pyi_out={gen}", *names], check=True)
        subprocess.run([*protoc, f"--grpc_python_out={gen}", *with_services], check=True)
        target = out / PREFIX.replace(".", "/")
        for source in sorted(gen.rglob("*.py*")):
            dest = target / source.relative_to(gen)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(_rewrite(source.read_text(), packages))
            folder = dest.parent
            while folder != target:
                (folder / "__init__.py").write_text(INIT)
                folder = folder.parent


if __name__ == "__main__":
    generate(Path(sys.argv[1]))
