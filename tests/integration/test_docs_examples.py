"""The docs stay true: every Python client example runs as copied, every file a shell
example sends exists, and every answer the docs show is what the server answers — all
against a real server on the committed default model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.server import Server, running_server

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[tuple[str, str, str | None]]:
    """(where, code, the json block right after it or None) for each fenced block."""
    found = []
    for path in DOCS:
        text = path.read_text()
        matches = list(FENCE.finditer(text))
        for i, match in enumerate(matches):
            if match[1] != language:
                continue
            line = text.count("\n", 0, match.start()) + 1
            after = matches[i + 1] if i + 1 < len(matches) else None
            follows = after is not None and after[1] == "json" and after.start() == match.end() + 1
            found.append((f"{path.name}:{line}", match[2], after[2] if follows else None))
    return found


def commands(code: str) -> list[tuple[str, str | None]]:
    """(shell command, the `# {...}` answer on the line after it or None). A command runs
    on to the next command or comment line (quoted JSON may span lines)."""
    lines = code.replace("\\\n", " ").splitlines()
    out: list[tuple[str, str | None]] = []
    current: list[str] = []
    for line in [*lines, "#"]:
        text = line.strip()
        if (text.startswith(("curl ", "#")) or not text) and current:
            answer = text[2:] if text.startswith("# {") else None
            out.append(("\n".join(current).split("  #")[0].strip(), answer))
            current = []
        if text.startswith("curl "):
            current = [line]
        elif current:
            current.append(line)
    return out


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running_server(ROOT / "model_repository", grpc_port=0) as srv:
        yield srv


def localize(text: str, server: Server) -> str:
    return text.replace("localhost:8000", f"127.0.0.1:{server.port}").replace(
        "localhost:8500", f"127.0.0.1:{server.grpc_port}"
    )


CLIENTS = [b for b in blocks("python") if "localhost:8" in b[1]]


@pytest.mark.parametrize(("where", "code", "_"), CLIENTS, ids=[b[0] for b in CLIENTS])
def test_python_client_examples_run_as_copied(
    server: Server, where: str, code: str, _: object
) -> None:
    assert len(CLIENTS) >= 3
    done = subprocess.run(
        [sys.executable, "-c", localize(code, server)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{where}:\n{done.stderr}"


def test_every_file_a_shell_example_sends_exists() -> None:
    referenced = {
        (where, name)
        for where, code, _ in blocks("bash")
        for name in re.findall(r"@([\w./-]+)", code)
        if "/" in name or "." in name
    }
    assert referenced
    missing = [f"{where}: @{name}" for where, name in referenced if not (ROOT / name).is_file()]
    assert not missing


def _same(shown: Any, served: Any) -> bool:
    """Equal, with scores compared to the digits the docs print."""
    if isinstance(shown, float) and isinstance(served, float):
        return abs(shown - served) < 1e-3
    if isinstance(shown, dict) and isinstance(served, dict):
        return shown.keys() == served.keys() and all(_same(shown[k], served[k]) for k in shown)
    if isinstance(shown, list) and isinstance(served, list):
        return len(shown) == len(served) and all(map(_same, shown, served))
    return bool(shown == served)


def _answered() -> list[tuple[str, str, str]]:
    """Each documented curl command with the answer the docs show for it."""
    found = []
    for where, code, block in blocks("bash"):
        found_here = commands(code)
        for command, answer in found_here:
            shown = answer or (block if len(found_here) == 1 else None)
            if shown is not None:
                found.append((where, command, shown))
    return found


ANSWERED = _answered()


@pytest.mark.parametrize(("where", "command", "answer"), ANSWERED, ids=[a[0] for a in ANSWERED])
def test_documented_answers_are_the_servers(
    server: Server, where: str, command: str, answer: str
) -> None:
    shown = json.loads(answer)  # the docs show whole answers, so this test can check them
    done = subprocess.run(
        ["bash", "-c", localize(command, server)], cwd=ROOT, capture_output=True, text=True
    )
    served = json.loads(done.stdout)
    assert _same(shown, served), f"{where}: the docs show\n{shown}\nthe server answers\n{served}"
