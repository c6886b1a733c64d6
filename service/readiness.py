"""Readiness of the whole server, not of whichever worker process answers the probe.

With ``--workers N`` every worker loads its own copy of each model, and the kernel hands
a probe to any one of them: a worker that finished loading would say "ready" while its
siblings still answer 503. So each worker publishes its own readiness as a file named
after its pid in a folder the parent process creates for the run, and a worker reports
ready only when N live workers have published. A worker that dies takes its vote with
it (its pid is no longer alive), and uvicorn's replacement votes once it has loaded.

Once the replica was whole, it stays ready while a worker is replaced: uvicorn respawns
a worker that died, and restarts them all one at a time on SIGHUP. The replacement finds
its siblings serving (:meth:`WorkerReadiness.replica_serving`) and takes no connection
until it has loaded (service.api.app), so every worker that answers serves; counting
votes then took the whole replica out of its load balancer (/readyz 503 on every
worker) while one worker loaded, and the replacement answered requests with 503
``model_not_ready`` meanwhile.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

READINESS_DIR_ENV = "CNNSERVE_READINESS_DIR"
# In the folder while the supervisor replaces the workers one at a time (SIGHUP): each
# new worker is serving before an old one gets SIGTERM, so the old one's stop is not
# the replica's, and it does not turn /readyz 503 for the probes it still answers.
RESTARTING = "restarting"
# In the folder once any worker saw every worker ready at once: the replica was whole.
# Each worker noting it for itself left one that had not looked since its sibling's vote
# came saying 503 when that sibling died (its periodic look runs every 0.25 s; a CI run
# killed the sibling first).
WHOLE = "whole"


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
        self._whole_once = False  # every worker was ready at once, or this one joined later
        self._published: str | None = None  # what its vote says (None: no vote)

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

    def publish(self, ready: bool, serving: Iterable[str] = ()) -> None:
        """This worker's vote: present while it is ready, naming the versions it serves
        (what a worker replacing a sibling must serve before it listens)."""
        if self._own is None:
            return
        if ready and not self._draining:
            text = "\n".join(sorted(serving))
            if text != self._published:
                self._own.write_text(text)
                self._published = text
            else:
                self._own.touch()
            # Whether the replica was whole is noted here, not only when a probe asks:
            # a worker no probe had reached before a sibling died said 503.
            self.all_ready()
        else:
            self._own.unlink(missing_ok=True)
            self._published = None

    def all_ready(self) -> bool:
        """Whether every worker has published ready (always true for one process that is
        not draining)."""
        if self._draining:
            return self.restarting()
        if self._directory is None or self._whole_once:
            return True
        if (self._directory / WHOLE).exists() or len(self._votes()) >= self._workers:
            (self._directory / WHOLE).touch()
            self._whole_once = True
        return self._whole_once

    def replica_serving(self) -> bool:
        """Whether another live worker of the run has published ready: this one joins a
        replica that serves already (it replaces a worker), and is ready from then on
        whenever it serves itself."""
        if self._directory is None:
            return False
        if self._others():
            self._whole_once = True
        return self._whole_once

    def served_by_others(self) -> set[str]:
        """The versions (``model/version``) the other live workers of the run serve, as
        their votes say (none when no other worker is ready now)."""
        if self._directory is None:
            return set()
        served: set[str] = set()
        for vote in self._others():
            with contextlib.suppress(OSError):  # its worker stopped meanwhile
                served.update(vote.read_text().split())
        return served

    def restarting(self) -> bool:
        """Whether the supervisor is replacing the workers one at a time (SIGHUP): a new
        worker that cannot start then keeps the old one in service."""
        return self._directory is not None and (self._directory / RESTARTING).exists()

    def _others(self) -> list[Path]:
        """The votes of the live workers other than this one."""
        return [vote for vote in self._votes() if vote != self._own]

    def _votes(self) -> list[Path]:
        assert self._directory is not None
        return [
            p for p in self._directory.iterdir() if p.name.isdigit() and process_alive(int(p.name))
        ]
