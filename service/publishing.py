"""Atomic publishing of a version folder.

A version is written into a hidden temp folder beside the versions (TF Serving and our
repository scanner only look at integer folder names), fsynced, then renamed to the
next free integer in one atomic step. A failure or a kill at any point leaves no
version folder; an existing version is never touched.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from service.errors import ExportError
from service.readiness import process_alive
from service.repository import MAX_VERSION, version_number

TMP_PREFIX = ".export-"
# A temp folder left this long is an export that died, wherever it ran: no export takes
# a day, and a publisher on another host cannot be asked whether it still runs.
STALE_TMP_SECONDS = 24 * 3600


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host() -> str:
    """This machine's name as it goes into a temp folder's name (no "/" or odd bytes)."""
    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "unknown"


def tmp_name() -> str:
    """``.export-<host>-<pid>-<random>``: the host and pid say who writes it, so that only
    a publisher on the same host judges whether the writer is alive (on a shared volume,
    ReadWriteMany, the pid of another host's publisher means nothing here)."""
    return f"{TMP_PREFIX}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _writer(name: str) -> tuple[str | None, int] | None:
    """(host, pid) of a temp folder's name, host None in the old ``.export-<pid>-<random>``
    form (written before the host was recorded); None when the name is neither."""
    parts = name[len(TMP_PREFIX) :].rsplit("-", 2)
    if len(parts) == 3 and parts[1].isascii() and parts[1].isdigit():
        return parts[0], int(parts[1])
    if len(parts) == 2 and parts[0].isascii() and parts[0].isdigit():
        return None, int(parts[0])
    return None


def _remove_stale_tmp(model_dir: Path) -> None:
    """Delete temp folders of exports that died (killed mid-export): those written on this
    host by a process that is gone, and any (whatever host, old names too) left for
    STALE_TMP_SECONDS. Another host's recent one may be an export in progress: kept."""
    host = _host()
    now = time.time()
    for path in model_dir.glob(f"{TMP_PREFIX}*"):
        writer = _writer(path.name)
        if writer is None:
            continue
        try:
            age = now - path.stat().st_mtime
        except OSError:  # gone meanwhile
            continue
        writer_host, pid = writer
        if age > STALE_TMP_SECONDS or (writer_host == host and not process_alive(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _next_number(model_dir: Path) -> int:
    """One past the highest number any entry is named by, folder or not: a stray file
    named "1" is not a version, but the rename could not take its name either."""
    taken = (n for p in model_dir.iterdir() if (n := version_number(p.name)) is not None)
    return max(taken, default=0) + 1  # the first is 1, as TF Serving's examples have it


def rename_into_place(tmp: Path, model_dir: Path) -> int:
    """Give ``tmp`` the next free version number; never overwrite an existing one."""
    for _ in range(1000):
        version = _next_number(model_dir)
        if version > MAX_VERSION:
            raise ExportError(f"{model_dir} has a version {MAX_VERSION}: no number is left")
        try:
            # rename(2) fails on a non-empty target, so two exporters racing for the same
            # number cannot both win; the loser takes the next number. A file that took
            # the number meanwhile fails it too (ENOTDIR), and is skipped next time.
            os.rename(tmp, model_dir / str(version))
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                continue
            raise
        _fsync(model_dir)
        return version
    raise ExportError(f"could not find a free version number in {model_dir}")


def publish_version(model_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)``, then publish tmp_dir as the next version, or nothing."""
    model_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(model_dir)
    tmp = model_dir / tmp_name()
    tmp.mkdir()
    try:
        write(tmp)
        for path in sorted(tmp.rglob("*"), reverse=True):
            _fsync(path)
        version = rename_into_place(tmp, model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model_dir / str(version)
