"""How many cores this process may use: what workers, inference and decode threads are
sized from. ``os.cpu_count()`` counts the machine's; a container limited to 2 CPUs on a
64-core node would start 8 workers of 64 decode threads each and spend its quota on
throttling."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The cores this process may run on (its affinity), capped by the tightest CPU quota
    of its cgroup and the cgroups above it, rounded up (v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``). Its own cgroup is read from
    ``/proc/self/cgroup``: the mount's root is the process's only inside a container
    with its own cgroup namespace (not under systemd's CPUQuota, nor --cgroupns=host)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quotas = [q for d in _cgroup_dirs(cgroup_root, proc_cgroup) if (q := _quota(d)) is not None]
    limit = math.ceil(min(quotas)) if quotas else None
    return max(1, min(cores or 1, limit or cores or 1))


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> Iterator[Path]:
    """The process's CPU cgroup folders, its own first, then each one above it; the
    mount's root alone when /proc/self/cgroup cannot be read."""
    own: tuple[Path, str] | None = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "" and path:  # v2's unified hierarchy: "0::/path"
            own = (root, path)
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            own = (root / "cpu", path)
            break
    if own is None:
        yield root
        yield root / "cpu"
        return
    base, path = own
    folder = base / path.lstrip("/")
    while True:
        yield folder
        if folder == base or base not in folder.parents:
            return
        folder = folder.parent


def _quota(folder: Path) -> float | None:
    """CPUs' worth of time per period in ``folder``, or None when unlimited or unread."""
    try:
        text = (folder / "cpu.max").read_text().split()
        if len(text) == 2:
            return None if text[0] == "max" else int(text[0]) / int(text[1])
    except (OSError, ValueError):
        pass
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
