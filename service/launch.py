"""Start ``cnnserve serve`` as a child process and wait on its readiness.

One place for the command line and the wait, shared by ``cnnserve bench`` and the tests
that talk to a real server.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve_command(repository: Path, port: int, grpc_port: int = 0, *args: str) -> list[str]:
    """``cnnserve serve`` on 127.0.0.1 with this interpreter (the venv running us)."""
    return [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        "--model-repository",
        str(repository),
        *args,
    ]


def http_status(url: str, context: ssl.SSLContext | None = None) -> int | None:
    """The status ``url`` answers with; None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_for(
    url: str,
    process: subprocess.Popen[bytes],
    status: int = 200,
    timeout: float = 120,
    context: ssl.SSLContext | None = None,
) -> None:
    """Poll ``url`` until it answers ``status``; fail at once if ``process`` exits.

    Raises RuntimeError (exited) or TimeoutError, naming the last status seen.
    """
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        last = http_status(url, context)
        if last == status:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{url} never answered {status} (last: {last})")


def stop(process: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM (a graceful shutdown), then SIGKILL if it takes longer than ``grace``."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
