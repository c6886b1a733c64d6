"""Workers and threads are sized from the cores a process may use: its affinity, capped
by the CPU quota of its cgroup and those above it (a container's CPU limit, a systemd
unit's CPUQuota), not the machine's count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.config import Settings
from service.cpus import usable_cpus

AFFINITY = len(os.sched_getaffinity(0))
V2_ROOT = "0::/\n"  # a container with its own cgroup namespace
V1_ROOT = "4:memory:/x\n1:cpu,cpuacct:/\n0::/\n"  # a v1 (hybrid) host's container


def cgroups(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "proc-cgroup").write_text(proc)
    return root, tmp_path / "proc-cgroup"


@pytest.mark.parametrize(
    ("proc", "files", "expected"),
    [
        (V2_ROOT, {"cpu.max": "max 100000\n"}, AFFINITY),  # no limit
        (V2_ROOT, {"cpu.max": "100000 100000\n"}, 1),  # one CPU
        (V2_ROOT, {"cpu.max": "50000 100000\n"}, 1),  # half a CPU: still one thread
        (V2_ROOT, {"cpu.max": "150000 100000\n"}, min(2, AFFINITY)),  # 1.5 rounds up
        (V2_ROOT, {"cpu.max": "garbage"}, AFFINITY),
        (V2_ROOT, {}, AFFINITY),  # no cgroup files (not Linux, or not mounted)
        (V1_ROOT, {"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"}, 1),
        (V1_ROOT, {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, AFFINITY),
        # Its own cgroup below the mount's root (systemd's CPUQuota, --cgroupns=host).
        (
            "0::/system.slice/gw.service\n",
            {"cpu.max": "max 100000", "system.slice/gw.service/cpu.max": "100000 100000"},
            1,
        ),
        # A limit on a cgroup above its own counts too: the tightest wins.
        (
            "0::/kubepods/pod1/c1\n",
            {"kubepods/pod1/cpu.max": "100000 100000", "kubepods/pod1/c1/cpu.max": "max 1"},
            1,
        ),
        ("4:cpu:/docker/abc\n", {"cpu/docker/abc/cpu.cfs_quota_us": "100000",
                                 "cpu/docker/abc/cpu.cfs_period_us": "100000"}, 1),
    ],
)  # fmt: skip
def test_the_quota_caps_the_cores(
    tmp_path: Path, proc: str, files: dict[str, str], expected: int
) -> None:
    assert usable_cpus(*cgroups(tmp_path, proc, files)) == expected


def test_no_proc_file_reads_the_mounts_root(tmp_path: Path) -> None:
    root, _ = cgroups(tmp_path, "", {"cpu.max": "100000 100000"})
    assert usable_cpus(root, tmp_path / "missing") == 1


def test_a_quota_above_the_cores_leaves_the_cores(tmp_path: Path) -> None:
    assert usable_cpus(*cgroups(tmp_path, V2_ROOT, {"cpu.max": "6400000 100000"})) == AFFINITY


def test_inference_threads_share_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers: tests/unit/test_server.py."""
    monkeypatch.setattr("service.config.usable_cpus", lambda: 2)
    assert Settings(workers=2).inference_threads == 1
    monkeypatch.setattr("service.config.usable_cpus", lambda: 64)
    assert Settings(workers=2).inference_threads == 32
