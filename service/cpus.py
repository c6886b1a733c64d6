"""How many cores this process may use: what workers, inference and decode threads are
sized from. ``os.cpu_count()`` counts the machine's; a container limited to 2 CPUs on a
64-core node would start 8 workers of 64 decode threads each and spend its quota on
throttling."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The cores this process may run on (its affinity), capped by its cgroup's CPU quota
    rounded up (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = _quota(cgroup_root)
    return max(1, min(cores or 1, math.ceil(quota) if quota else cores or 1))


def _quota(root: Path) -> float | None:
    """CPUs' worth of time per period, or None when unlimited or unreadable."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        if text:
            return None
        raise OSError("empty cpu.max")
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
