"""docker/'s deployment files, read the way their tools read them: the compose file, the
Dockerfile and its .dockerignore, the Kubernetes manifests rendered like kustomize, and the
flags TF Serving defines."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
K8S = DOCKER / "k8s"
REPOSITORY = ROOT / "model_repository"

# Every flag of `tensorflow_model_server`: the `flag_list` of main() in TF Serving's
# tensorflow_serving/model_servers/main.cc, as of the 2.x sources that define
# enable_serialization_as_tensor_content (the newest version found).
# The only list of them: compose's and Kubernetes' TF Serving command lines may use
# nothing else.
TFSERVING_FLAGS = frozenset(
    {
        "port",
        "grpc_socket_path",
        "rest_api_port",
        "rest_api_num_threads",
        "rest_api_timeout_in_ms",
        "rest_api_enable_cors_support",
        "enable_batching",
        "allow_version_labels_for_unavailable_models",
        "batching_parameters_file",
        "enable_per_model_batching_parameters",
        "model_config_file",
        "model_config_file_poll_wait_seconds",
        "model_name",
        "model_base_path",
        "num_load_threads",
        "num_unload_threads",
        "max_num_load_retries",
        "load_retry_interval_micros",
        "file_system_poll_wait_seconds",
        "flush_filesystem_caches",
        "tensorflow_session_parallelism",
        "tensorflow_session_config_file",
        "tensorflow_intra_op_parallelism",
        "tensorflow_inter_op_parallelism",
        "use_alts_credentials",
        "ssl_config_file",
        "platform_config_file",
        "per_process_gpu_memory_fraction",
        "saved_model_tags",
        "grpc_channel_arguments",
        "grpc_max_threads",
        "enable_model_warmup",
        "num_request_iterations_for_warmup",
        "version",
        "monitoring_config_file",
        "remove_unused_fields_from_bundle_metagraph",
        "prefer_tflite_model",
        "num_tflite_pools",
        "num_tflite_interpreters_per_pool",
        "enable_signature_method_name_check",
        "xla_cpu_compilation_enabled",
        "xla_gpu_compilation_enabled",
        "enable_profiler",
        "thread_pool_factory_config_file",
        "mixed_precision",
        "skip_initialize_tpu",
        "enable_grpc_healthcheck_service",
        "enable_serialization_as_tensor_content",
    }
)

# Flags whose value is a file TF Serving parses, and the message it parses it as.
TFSERVING_FILE_FLAGS = {
    "model_config_file": "models.config",
    "batching_parameters_file": "batching.config",
    "monitoring_config_file": "monitoring.config",
}

_FLAG = re.compile(r"^--([a-z0-9_]+)(?:=(.*))?$")


def tfserving_flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` (or a bare ``--name``, "true") arguments as a dict; anything else
    is an error, as it would be for TF Serving's flag parser."""
    flags = {}
    for arg in args:
        match = _FLAG.match(arg)
        assert match, f"not a --flag=value argument: {arg!r}"
        flags[match.group(1)] = "true" if match.group(2) is None else match.group(2)
    return flags


def load_compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return compose


# --- .dockerignore -------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignore_allows(path: str, lines: list[str]) -> bool:
    """Whether Docker sends ``path`` (relative, '/'-separated) with the build context: the
    last pattern matching the path or one of its parent folders decides; `!` re-includes."""
    included = True
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = str(PurePosixPath(line.lstrip("!").strip("/")))
        regex = _pattern_regex(pattern)
        if any(regex.match(c) for c in candidates):
            included = exception
    return included


def build_context(root: Path = ROOT) -> list[str]:
    """The files (relative paths) `docker build` sends from ``root``. Like Docker, it does
    not descend into an excluded folder that no `!` pattern reaches into."""
    lines = (root / ".dockerignore").read_text().splitlines()
    exceptions = [ln.strip()[1:].strip("/") for ln in lines if ln.strip().startswith("!")]
    files = []
    for folder, dirs, names in os.walk(root):
        base = Path(folder).relative_to(root)
        dirs[:] = [
            d
            for d in dirs
            if dockerignore_allows((rel := (base / d).as_posix()), lines)
            or any(e.startswith(rel + "/") for e in exceptions)
        ]
        files += [rel for n in names if dockerignore_allows((rel := (base / n).as_posix()), lines)]
    return sorted(files)


# --- kustomize (the subset docker/k8s uses) -------------------------------------------

KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "generatorOptions",
    "patches",
}


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def apply_json6902(document: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 ``add``, ``replace`` and ``remove`` (what the overlays use)."""
    document = copy.deepcopy(document)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = document
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                node[index] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[index]
            else:
                raise ValueError(f"unsupported op {kind!r}")
        elif kind == "add":
            node[last] = copy.deepcopy(op["value"])
        elif kind in ("replace", "remove"):
            if last not in node:
                raise KeyError(f"{op['path']}: nothing to {kind}")
            if kind == "replace":
                node[last] = copy.deepcopy(op["value"])
            else:
                del node[last]
        else:
            raise ValueError(f"unsupported op {kind!r}")
    return document


def _matches(obj: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    return (
        obj["kind"] == target["kind"]
        and obj["metadata"]["name"] == target["name"]
        and target.get("group", "") == group
        and target.get("version", version) == version
    )


def render_kustomization(folder: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build folder` prints, for kustomization files that use only
    KUSTOMIZATION_FIELDS (raises on any other field, so the files stay in that subset)."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - KUSTOMIZATION_FIELDS
    if unknown:
        raise ValueError(f"{folder}: kustomization fields this renderer lacks: {unknown}")
    objects: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        path = (folder / resource).resolve()
        if path.is_dir():
            objects += render_kustomization(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    options = spec.get("generatorOptions", {})
    generators = spec.get("configMapGenerator", [])
    if set(options) - {"disableNameSuffixHash"} or (generators and not options):
        # kustomize would append a content hash to the names: not rendered here.
        raise ValueError(f"{folder}: generators need generatorOptions.disableNameSuffixHash")
    for generator in generators:
        if set(generator) - {"name", "files"}:
            raise ValueError(f"{folder}: configMapGenerator supports name and files")
        data = {Path(f).name: (folder / f).read_text() for f in generator["files"]}
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": data,
            }
        )
    for patch in spec.get("patches", []):
        ops = yaml.safe_load((folder / patch["path"]).read_text())
        assert isinstance(ops, list), f"{patch['path']}: only JSON6902 patches (a list of ops)"
        hits = [i for i, obj in enumerate(objects) if _matches(obj, patch["target"])]
        if len(hits) != 1:
            raise ValueError(f"{patch['path']}: target {patch['target']} matches {len(hits)}")
        objects[hits[0]] = apply_json6902(objects[hits[0]], ops)
    return objects


def kustomizations() -> list[Path]:
    """Every folder under docker/k8s with a kustomization.yaml (base and overlays)."""
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found
