"""Readiness of the whole server, not of whichever worker process answers the probe.

With ``--workers N`` every worker loads its own copy of each model, and the kernel hands
a probe to any one of them: a worker that finished loading would say "ready" while its
siblings still answer 503. So each worker publishes its own readiness as a file named
after its pid in a folder the parent process creates for the run, and a worker reports
ready only when N live workers have published. A worker that dies takes its vote with
it (its pid is no longer alive), and uvicorn's replacement votes once it has loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

READINESS_DIR_ENV = "CNNSERVE_READINESS_DIR"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class WorkerReadiness:
    """One worker's view: publish its own state, count the live ready workers."""

    def __init__(self, directory: Path | None, workers: int) -> None:
        self._directory = directory if workers > 1 else None
        self._workers = workers
        self._own = None if self._directory is None else self._directory / f"{os.getpid()}"
        self._draining = False

    def drain(self) -> None:
        """Shutting down: from now on this worker, and so the server, reports not ready."""
        self._draining = True
        self.publish(False)

    @property
    def draining(self) -> bool:
        return self._draining

    @classmethod
    def from_environment(cls, workers: int) -> WorkerReadiness:
        """The folder ``cnnserve serve`` made for this run; none for a single process."""
        folder = os.environ.get(READINESS_DIR_ENV)
        return cls(Path(folder) if folder else None, workers)

    def publish(self, ready: bool) -> None:
        if self._own is None:
            return
        if ready and not self._draining:
            self._own.touch()
        else:
            self._own.unlink(missing_ok=True)

    def all_ready(self) -> bool:
        """Whether every worker has published ready (always true for one process that is
        not draining)."""
        if self._draining:
            return False
        if self._directory is None:
            return True
        votes = [
            p for p in self._directory.iterdir() if p.name.isdigit() and process_alive(int(p.name))
        ]
        return len(votes) >= self._workers
