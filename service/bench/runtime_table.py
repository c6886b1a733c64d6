"""The runtime table: each in-process runtime on one version at several batch sizes
(the numbers behind ``CNNSERVE_RUNTIME=auto``), and a description of the machine."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}


def bench_runtimes(
    version_dir: Path, *, cache_dir: Path, batch_sizes: list[int], seconds: float, threads: int
) -> list[dict[str, Any]]:
    from service.runtimes import create_runtime

    rows = []
    rng = np.random.default_rng(0)
    for name in ("tensorflow", "litert"):
        runtime = create_runtime(name, version_dir, cache_dir=cache_dir, threads=threads)
        runtime.load()
        for size in batch_sizes:
            batch = rng.integers(0, 256, (size, 224, 224, 3), dtype=np.uint8)
            runtime.predict(batch)
            times: list[float] = []
            started = time.perf_counter()
            while time.perf_counter() - started < seconds or len(times) < 5:
                t0 = time.perf_counter()
                runtime.predict(batch)
                times.append(time.perf_counter() - t0)
            ms = np.array(times) * 1e3
            rows.append(
                {
                    "runtime": name,
                    "threads": threads,
                    "batch": size,
                    "images_per_s": round(size * len(times) / sum(times), 1),
                    "p50_ms": round(float(np.percentile(ms, 50)), 3),
                    "p99_ms": round(float(np.percentile(ms, 99)), 3),
                }
            )
            sys.stderr.write(f"  {rows[-1]}\n")
        runtime.unload()
    return rows
