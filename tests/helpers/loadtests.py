"""The loadtests/ folder: run its locust runner, and import its plain modules.

loadtests/ is not a package (locust puts a locustfile's folder on sys.path and the
locustfile imports its neighbours by name), so tests load those modules by path.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from types import ModuleType

from tests.helpers.server import ROOT

LOADTESTS = ROOT / "loadtests"
# What `make loadtest` reads from the environment: a test passes options instead.
RUNNER_VARIABLES = frozenset(
    [
        "HOST",
        "GRPC_HOST",
        "PROTOCOL",
        "USERS",
        "SPAWN_RATE",
        "DURATION",
        "TARGET_RPS",
        "MAX_P99_MS",
        "MAX_FAIL_RATIO",
        "PROCESSES",
        "MODEL",
        "MODEL_REPOSITORY",
        "IMAGE_MIX",
        "ENCODING_MIX",
        "API_KEY",
        "GRPC_TLS",
        "GRPC_CA",
        "REQUEST_TIMEOUT",
    ]
)


def load_module(name: str) -> ModuleType:
    """loadtests/<name>.py as a module (registered under ``loadtests_<name>``); its
    folder on sys.path, as locust puts it, for the neighbours it imports by name."""
    if str(LOADTESTS) not in sys.path:
        sys.path.append(str(LOADTESTS))
    spec = importlib.util.spec_from_file_location(f"loadtests_{name}", LOADTESTS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_loadtest(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python loadtests/run.py ARGS`` (what `make loadtest` runs), output captured."""
    return subprocess.run(
        [sys.executable, str(LOADTESTS / "run.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k not in RUNNER_VARIABLES}
        | {"TF_CPP_MIN_LOG_LEVEL": "2"},
    )
