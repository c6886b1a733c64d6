"""docker/Dockerfile and .dockerignore: a slim multi-stage build of the project from the
same pyproject.toml the tests install (built here from exactly the files the build context
lets through), runtime dependencies only, a non-root user, and an entrypoint that is the
`cnnserve serve` the tests run. (The entrypoint and HEALTHCHECK are run against a real
server in tests/integration/test_deployment.py.)"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from service.config import Settings
from service.launch import serve_command
from tests.helpers.deployment import DOCKERFILE, ROOT, build_context, dockerignore_allows

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[dict[str, Any]]:
    structure: list[dict[str, Any]] = DockerfileParser(str(DOCKERFILE)).structure
    return [i for i in structure if i["instruction"] != "COMMENT"]


def stages() -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    for i in instructions():
        if i["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(i)
    return out


def exec_form(value: str) -> list[str]:
    parsed: list[str] = json.loads(value)
    return parsed


def pip_install(stage: list[dict[str, Any]]) -> list[str]:
    """The arguments of the stage's `pip install` (the one that installs the project)."""
    for i in stage:
        if i["instruction"] == "RUN" and "pip install" in i["value"]:
            command = i["value"].split("&&")[0]
            words = shlex.split(command)
            return words[words.index("install") + 1 :]
    raise AssertionError("no pip install in the build stage")


def makefile_install() -> list[str]:
    """The arguments of `make install`'s pip install of the project (past the options
    every pip call there takes)."""
    found = re.search(
        r"pip install .*?--disable-pip-version-check (.*-e '\.\[[a-z,]+\]')",
        (ROOT / "Makefile").read_text(),
    )
    assert found, "make install no longer installs -e '.[...]'"
    return shlex.split(found.group(1))


def makefile_extras() -> set[str]:
    """The extras `make install` (and so `make test`) installs the project with."""
    found = re.fullmatch(r"\.\[([a-z,]+)\]", makefile_install()[-1])
    assert found, "make install no longer installs -e '.[...]'"
    return set(found.group(1).split(","))


def test_multi_stage_slim_runtime_without_build_tools() -> None:
    build, runtime = stages()
    arg = next(i for i in instructions() if i["instruction"] == "ARG")
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.1[1-9]-slim(-\w+)?", arg["value"])
    assert build[0]["value"].startswith("${PYTHON_IMAGE} AS build")
    assert runtime[0]["value"] == "${PYTHON_IMAGE} AS runtime"
    text = DOCKERFILE.read_text()
    for tool in ("apt-get", "build-essential", "gcc", "g++"):
        assert not re.search(rf"^RUN .*\b{re.escape(tool)}\b", text, re.MULTILINE), tool
    copies = [i["value"] for i in runtime if i["instruction"] == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"], "the runtime gets the venv only"


def test_image_installs_the_projects_runtime_dependencies_only() -> None:
    (build, _) = stages()
    args = pip_install(build)
    # The versions the tests ran with: the constraints `make install` passes too.
    assert args[:2] == ["-c", "constraints.txt"], args
    assert makefile_install()[:2] == ["-c", "constraints.txt"]
    targets = [a for a in args[2:] if not a.startswith("-")]
    assert len(targets) == 1
    found = re.fullmatch(r"\.(?:\[([a-z,]+)\])?", targets[0])
    assert found, f"the image must install the project itself, not {targets[0]}"
    extras = set(filter(None, (found.group(1) or "").split(",")))
    assert "dev" not in extras
    # Whatever the image installs, the tests install too (same pyproject.toml).
    assert extras <= makefile_extras()
    assert extras <= set(PYPROJECT["project"].get("optional-dependencies", {}))
    assert not any(a.startswith(("-r", "--requirement")) for a in args)


def test_non_root_user_ports_and_settings() -> None:
    _, runtime = stages()
    users = [i["value"] for i in runtime if i["instruction"] == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), "numeric non-root"
    (expose,) = [i["value"].split() for i in runtime if i["instruction"] == "EXPOSE"]
    settings_env = DockerfileParser(str(DOCKERFILE)).envs
    ports = [settings_env[f"CNNSERVE_{p}"] for p in ("PORT", "GRPC_PORT", "PROBE_PORT")]
    assert expose == ports
    assert expose[:2] == [str(Settings().port), str(Settings().grpc_port)]
    # The probes and the scrape on a port of their own (docker/k8s probes it; `make run`
    # has none, the default).
    assert int(settings_env["CNNSERVE_PROBE_PORT"]) and not Settings().probe_port
    fields = {f"CNNSERVE_{f.upper()}" for f in Settings.model_fields}
    ours = {k for k in settings_env if k.startswith("CNNSERVE_")}
    assert ours <= fields, f"not settings of service/config.py: {ours - fields}"
    assert settings_env["CNNSERVE_HOST"] == "0.0.0.0"
    assert settings_env["CNNSERVE_MODEL_REPOSITORY"] == "/models"


def test_entrypoint_is_the_cnnserve_serve_the_tests_run() -> None:
    entrypoint = next(i for i in instructions() if i["instruction"] == "ENTRYPOINT")
    cmd = next(i for i in instructions() if i["instruction"] == "CMD")
    assert exec_form(entrypoint["value"]) + exec_form(cmd["value"]) == ["cnnserve", "serve"]
    # `cnnserve` is the console script of service.cli:main, which the tests' servers run
    # as `python -m service.cli serve` (service.launch.serve_command).
    assert PYPROJECT["project"]["scripts"]["cnnserve"] == "service.cli:main"
    assert serve_command(Path("r"), 1)[1:4] == ["-m", "service.cli", "serve"]
    healthcheck = next(i for i in instructions() if i["instruction"] == "HEALTHCHECK")
    assert "/readyz" in healthcheck["value"]


@pytest.mark.parametrize(
    ("path", "sent"),
    [
        ("pyproject.toml", True),
        ("constraints.txt", True),
        ("service/cli.py", True),
        ("service/proto_gen/cnnserve_v1_pb2.py", True),
        ("service/__pycache__/cli.cpython-311.pyc", False),
        ("service/runtimes/__pycache__/x.pyc", False),
        (".venv/bin/python", False),
        (".train/ckpt", False),
        ("reports/fmnist/report.json", False),
        ("model_repository/models.config", False),
        ("tests/conftest.py", False),
        ("docker/Dockerfile", False),
    ],
)
def test_dockerignore(path: str, sent: bool) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert dockerignore_allows(path, lines) is sent


def test_the_build_context_builds_the_project(tmp_path: Path) -> None:
    """The build stage's install, from exactly the files the context sends, laid out as
    its COPY instructions lay them: a wheel of the whole package with the entry point."""
    context = build_context()
    (build, _) = stages()
    copied: list[str] = []
    for i in build:
        if i["instruction"] == "COPY":
            *sources, _dest = i["value"].split()
            copied += sources
    src = tmp_path / "src"
    for rel in context:
        if any(rel == s or rel.startswith(s.rstrip("/") + "/") for s in copied):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    readme = PYPROJECT["project"]["readme"]
    assert (src / readme).is_file() and (src / "pyproject.toml").is_file()
    wheels = tmp_path / "wheels"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"),
            *("-q", "--no-index", "-w", str(wheels), str(src)),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = wheels.glob("cnnserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "service").rglob("*.py")}
    assert package <= set(names), f"missing from the image: {sorted(package - set(names))[:5]}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "cnnserve = service.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
