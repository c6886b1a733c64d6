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
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert Settings().workers == 2  # the 2-core machine the performance budget is for
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    assert Settings().workers == MAX_AUTO_WORKERS
    assert Settings(workers=3).workers == 3
