"""Workers and threads are sized from the cores a process may use: its affinity, capped
by its cgroup's CPU quota (a container's CPU limit), not the machine's count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.config import Settings
from service.cpus import usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, AFFINITY),  # v2, no limit
        ({"cpu.max": "100000 100000\n"}, 1),  # v2, one CPU
        ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU: still one thread
        ({"cpu.max": "150000 100000\n"}, min(2, AFFINITY)),  # 1.5 rounds up
        ({"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"}, 1),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, AFFINITY),
        ({"cpu.max": "garbage"}, AFFINITY),
        ({}, AFFINITY),  # no cgroup files (not Linux, or not mounted)
    ],
)
def test_the_quota_caps_the_cores(tmp_path: Path, files: dict[str, str], expected: int) -> None:
    assert usable_cpus(cgroup(tmp_path, files)) == expected


def test_a_quota_above_the_cores_leaves_the_cores(tmp_path: Path) -> None:
    assert usable_cpus(cgroup(tmp_path, {"cpu.max": "6400000 100000"})) == AFFINITY


def test_inference_threads_share_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers: tests/unit/test_server.py."""
    monkeypatch.setattr("service.config.usable_cpus", lambda: 2)
    assert Settings(workers=2).inference_threads == 1
    monkeypatch.setattr("service.config.usable_cpus", lambda: 64)
    assert Settings(workers=2).inference_threads == 32
