"""A server under test: start it, wait for it, and watch its CPU and memory.

CPU time and resident memory are read from /proc for the whole process tree (uvicorn's
supervisor and its workers), so a point's numbers cover every worker.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from service.launch import stop, wait_for

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; everything after its ')' splits cleanly.
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant alive now."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            parents[int(entry.name)] = int(fields[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        if fields := _stat(pid):
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / _TICK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        if fields := _stat(pid):
            total += int(fields[21]) * _PAGE
    return total


@dataclass
class Usage:
    """CPU seconds and resident memory (sampled every half second) of a process tree
    over one interval (a ``with`` block)."""

    root: int
    cpu_s: float = 0.0
    wall_s: float = 0.0
    rss: list[int] = field(default_factory=list)  # bytes, from the block's start
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def peak_rss(self) -> int:
        return max(self.rss, default=0)

    @contextmanager
    def measure(self) -> Iterator[Usage]:
        pids = process_tree(self.root)
        cpu0, t0 = cpu_seconds(pids), time.monotonic()
        self.rss = [rss_bytes(pids)]
        self._stop.clear()
        sampler = threading.Thread(target=self._sample, args=(pids,), daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            self._stop.set()
            sampler.join()
            self.cpu_s = cpu_seconds(pids) - cpu0
            self.wall_s = time.monotonic() - t0

    def _sample(self, pids: list[int]) -> None:
        while not self._stop.wait(0.5):
            self.rss.append(rss_bytes(pids))

    def as_dict(self) -> dict[str, float]:
        return {
            "server_cores": round(self.cpu_s / self.wall_s, 2) if self.wall_s else 0.0,
            "server_rss_mb": round(self.peak_rss / 2**20, 1),
        }


class ServerDidNotStart(RuntimeError):
    """A server the bench started exited or never became ready; the message ends with
    its log's tail (what it said about why)."""


@contextmanager
def started(cmd: list[str], *, env: dict[str, str], ready_url: str, log: Path) -> Iterator[int]:
    """Run ``cmd`` until the block ends (SIGTERM, then SIGKILL); yields its pid once
    ``ready_url`` answers 200. The output goes to ``log``."""
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        try:
            wait_for(ready_url, process, timeout=180)
        except (RuntimeError, TimeoutError) as exc:
            tail = log.read_text(errors="replace")[-2000:]
            raise ServerDidNotStart(f"{' '.join(cmd[:4])}…: {exc}\n{tail}") from None
        yield process.pid
    finally:
        stop(process)
