"""Atomic publishing of a version folder.

A version is written into a hidden temp folder beside the versions (TF Serving and our
repository scanner only look at integer folder names), fsynced, then renamed to the
next free integer in one atomic step. A failure or a kill at any point leaves no
version folder; an existing version is never touched.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from service.errors import ExportError
from service.repository import version_dirs

TMP_PREFIX = ".export-"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_tmp(model_dir: Path) -> None:
    """Delete temp folders of exports whose process is gone (killed mid-export)."""
    for path in model_dir.glob(f"{TMP_PREFIX}*"):
        try:
            pid = int(path.name[len(TMP_PREFIX) :].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def rename_into_place(tmp: Path, model_dir: Path) -> int:
    """Give ``tmp`` the next free version number; never overwrite an existing one."""
    for _ in range(1000):
        version = max(version_dirs(model_dir), default=0) + 1
        try:
            # rename(2) fails on a non-empty target, so two exporters racing for the same
            # number cannot both win; the loser takes the next number.
            os.rename(tmp, model_dir / str(version))
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise
        _fsync(model_dir)
        return version
    raise ExportError(f"could not find a free version number in {model_dir}")


def publish_version(model_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)``, then publish tmp_dir as the next version, or nothing."""
    model_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(model_dir)
    tmp = model_dir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
