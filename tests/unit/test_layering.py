"""No module imports one above it: transports → core → runtimes/repository/preprocessing
→ errors/config. Lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[2] / "service"

# Top to bottom; a module may import its own layer and those below. Longest prefix wins.
LAYERS: dict[str, int] = {
    "service.api": 3,
    "service.cli": 3,
    "service.cli_data": 3,
    "service.cli_rollout": 3,
    "service.cli_train": 3,
    "service.cli_bench": 3,
    "service.server": 3,
    "service.launch": 3,
    "service.bench": 3,
    "service.dataplane": 2,
    "service.registry": 2,
    "service.routing": 2,
    "service.loading": 2,
    "service.sources": 2,
    "service.batching": 2,
    "service.samples": 2,  # demo-page samples from warmup records or the dataset
    "service.verify": 2,  # offline predictions (training's) against a live server
    "service.verify_clients": 2,
    "service.training": 2,  # offline: uses the lower layers, never the serving core's
    "service.runtimes": 1,
    "service.repository": 1,
    "service.publishing": 1,
    "service.config_edit": 1,
    "service.promotion": 1,
    "service.client_trust": 1,  # verify and promote trusting a server's TLS certificate
    "service.preprocessing": 1,
    "service.metrics": 1,
    "service.requestlog": 1,
    "service.concurrency": 1,
    "service.pace_check": 1,
    "service.readiness": 1,
    "service.memory": 1,  # freed heap memory given back to the system
    "service.siblings": 1,
    "service.shared_hosts": 1,
    "service.signatures": 1,
    "service.warmup": 1,
    "service.tfserving_proto": 1,
    "service.tfrecord": 1,
    "service.errors": 0,
    "service.config": 0,
    "service.contract": 0,
    "service.logs": 0,
    "service.proto_gen": 0,
    "service": 0,  # the package itself (__version__)
}
NAMES = {1: "lower", 2: "core", 3: "transports", 0: "base"}


def layer(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module} has no layer in this test: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "service":  # from service import x: x may be a module
                found |= {f"service.{a.name}" for a in node.names}
            elif node.module.startswith("service"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("service")}
    return found


SOURCES = sorted(p for p in SERVICE.rglob("*.py") if "proto_gen" not in p.parts)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_no_module_imports_a_layer_above_it(path: Path) -> None:
    own = layer(module_name(path))
    upward = sorted(
        f"{target} ({NAMES[layer(target)]})"
        for target in imports(path)
        if (layer(target) if target != "service.__version__" else 0) > own
    )
    assert not upward, f"{module_name(path)} ({NAMES[own]}) imports {upward}"
