"""The serve command's metrics folder: fresh per run, removed at exit, orphans swept."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from service import server


def test_metrics_folder_is_fresh_removed_at_exit_and_orphans_are_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(server.MULTIPROC_ENV, raising=False)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    orphan = tmp_path / f"{server.METRICS_DIR_PREFIX}{int(dead.stdout)}-abc"  # kill -9 leftover
    running = tmp_path / f"{server.METRICS_DIR_PREFIX}{os.getppid()}-def"  # another live server
    unrelated = tmp_path / f"{server.METRICS_DIR_PREFIX}notapid"
    for folder in (orphan, running, unrelated):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"")

    with server._metrics_directory():
        ours = Path(os.environ[server.MULTIPROC_ENV])
        assert ours.is_dir() and ours.parent == tmp_path
        assert ours.name.startswith(f"{server.METRICS_DIR_PREFIX}{os.getpid()}-")
        assert not orphan.exists()
        assert running.exists() and unrelated.exists()
    assert not ours.exists()
    assert server.MULTIPROC_ENV not in os.environ


def test_workers_default_to_one_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.config import MAX_AUTO_WORKERS, Settings

    monkeypatch.delenv("CNNSERVE_WORKERS", raising=False)
    monkeypatch.setattr("service.config.usable_cpus", lambda: 2)
    assert Settings().workers == 2  # the 2-core machine the performance budget is for
    monkeypatch.setattr("service.config.usable_cpus", lambda: 96)
    assert Settings().workers == MAX_AUTO_WORKERS
    assert Settings(workers=3).workers == 3


def test_the_heap_is_frozen_after_a_good_start_only() -> None:
    import asyncio
    import gc

    from service.api.app import _after_loading

    async def fail() -> None:
        raise RuntimeError("models.config is broken")

    async def succeed() -> None:
        return None

    async def finished(coro: object) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        await asyncio.gather(task, return_exceptions=True)
        return task  # type: ignore[no-any-return]

    gc.unfreeze()
    try:
        _after_loading(asyncio.run(finished(fail())))
        assert gc.get_freeze_count() == 0  # what is left of a failed start is garbage
        _after_loading(asyncio.run(finished(succeed())))
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_an_encrypted_tls_key_is_named_not_prompted_for(tmp_path: Path) -> None:
    """OpenSSL asked for the passphrase on the terminal, and start-up hung there."""
    from service.config import Settings

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-days", "1", "-subj", "/CN=x",
         "-keyout", str(key), "-out", str(cert), "-passout", "pass:secret"],
        check=True, capture_output=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    problem = server._tls_problem(Settings(tls_certfile=cert, tls_keyfile=key))
    assert problem is not None and "is encrypted" in problem and "openssl pkey" in problem
    plain = tmp_path / "plain.pem"
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-passin", "pass:secret", "-out", str(plain)],
        check=True,
        capture_output=True,
    )
    assert server._tls_problem(Settings(tls_certfile=cert, tls_keyfile=plain)) is None


def test_only_a_rolling_restart_gives_a_new_worker_long_to_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """uvicorn's timeout_worker_healthcheck is both how long a new worker may take to be
    ready on SIGHUP (loading the models: long) and how long a worker's ping may take
    before it is thought hung (short: set for good at 300 s, one stopped worker held up
    the supervisor, its respawns and its SIGTERM for minutes)."""
    from uvicorn.supervisors import Multiprocess

    from service.readiness import READINESS_DIR_ENV, RESTARTING
    from service.server import WORKER_START_SECONDS, GatewayConfig, _Supervisor

    during: list[tuple[int, bool]] = []

    def restart_all(self: Multiprocess) -> None:
        during.append((self.config.timeout_worker_healthcheck, (tmp_path / RESTARTING).exists()))

    monkeypatch.setattr(Multiprocess, "restart_all", restart_all)
    monkeypatch.setenv(READINESS_DIR_ENV, str(tmp_path))
    config = GatewayConfig(
        "service.api.app:create_app", factory=True, workers=2, handshake_timeout=1
    )
    short = config.timeout_worker_healthcheck
    _Supervisor(config, sockets=[]).restart_all()
    assert during == [(WORKER_START_SECONDS, True)]
    assert config.timeout_worker_healthcheck == short < 30
    assert not (tmp_path / RESTARTING).exists()


def test_a_signal_wakes_the_supervisor_at_once() -> None:
    """uvicorn's supervisor looked at its signals every 0.5 s: a SIGTERM to the whole
    process group reached the workers first, which closed their listeners while the
    supervisor held its copy of the socket; connections the kernel queued meanwhile
    were reset when it closed, their requests sent and lost. With its tick at a minute,
    a SIGTERM still ends its loop at once (a process of its own: signal handlers)."""
    script = """
import os, signal, sys, threading, time
from service import server
server.SUPERVISOR_TICK_SECONDS = 60
supervisor = server._Supervisor(
    server.GatewayConfig("service.api.app:create_app", factory=True, workers=1,
                         handshake_timeout=1),
    sockets=[],
)
supervisor.processes_num = 0  # the loop alone
# uvicorn's own loop waited on this between its looks at the signals: a minute here.
supervisor.should_exit.wait = lambda timeout=None: time.sleep(60)
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
started = time.monotonic()
supervisor.run()
print(time.monotonic() - started)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=50, check=True
    )
    assert float(done.stdout.split()[-1]) < 30, done.stderr  # the tick is 60 s
