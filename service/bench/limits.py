"""The physical limit: what the server's parts can do alone, on the same image.

Three costs per request, each in core-seconds, measured beside the sweep:

- HTTP alone: the same server stack answering ``GET /healthz`` (no body, no model),
  server CPU time divided by requests;
- decode + resize alone: :func:`service.preprocessing.preprocess_bytes` on the posted
  images (the mean over the set when requests carry varied bodies), one thread, the
  fastest of a few fresh processes each pinned to one core (below);
- inference alone: the runtime the server picks, one thread, at each batch size up to
  ``max_batch_size``, per image.

A point's limit is the cores the server could use (the box's cores less what the load
generator took) divided by the sum of the three at the batch size the server actually
formed at that point; serving efficiency is end-to-end req/s over that limit.
"""

from __future__ import annotations

import bisect
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.config import Settings


def _timed(fn: Any, seconds: float, min_runs: int = 5) -> list[float]:
    fn()  # warm-up
    times: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < min_runs:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# Decoding the same JPEGs through Pillow alone took ~0.23 or 0.31-0.42 ms each on one
# host, steady within a process and decided by where Pillow's and libjpeg's row buffers
# fall in its heap (and by moves between cores). Plain JPEGs no longer go through
# Pillow (service/jpeg.py), but their decode still depends on the process, less so
# (0.163-0.201 ms over 6 processes on a Xeon): libjpeg-turbo writes rows that start on a
# 32-byte boundary with non-temporal stores, and where numpy's output buffer lands
# decides that (docs/performance.md). Measured in the bench's own process, the limit
# then came out ~0.17 ms per request too high or not, run by run (efficiency 76% or
# 103% for the same server), so it is the fastest of a few fresh, pinned processes
# (about half of them came out slow there, so 5 miss the fast state 1 time in 32).
DECODE_PROCESSES = 5


def decode_cost(
    images: list[bytes], version_dir: Path, settings: Settings, seconds: float
) -> float:
    """Core-seconds to decode and resize one of ``images`` as the gateway does: in
    each of DECODE_PROCESSES fresh processes pinned to one core, the median run (a run
    decodes every image once) over the number of images; the fastest process."""
    share = seconds / DECODE_PROCESSES
    with tempfile.TemporaryDirectory(prefix="cnnserve-decode-") as tmp:
        folder = Path(tmp)
        for i, image in enumerate(images):
            (folder / f"{i:05d}").write_bytes(image)
        costs = [
            _decode_in_process(folder, version_dir, settings.max_image_pixels, share, i)
            for i in range(DECODE_PROCESSES)
        ]
    return min(costs)


def _decode_in_process(
    folder: Path, version_dir: Path, max_pixels: int, seconds: float, index: int
) -> float:
    # Pinned where the OS can (Linux); elsewhere "-", unpinned.
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else ["-"]
    command = [sys.executable, "-m", "service.bench.limits", str(folder), str(version_dir)]
    command += [str(max_pixels), str(seconds), str(cores[index % len(cores)])]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"decode measurement failed: {done.stderr.strip()[-500:]}")
    return float(done.stdout.split()[-1])


def _decode_alone(folder: Path, version_dir: Path, max_pixels: int, seconds: float) -> float:
    """In this process: seconds per image, the median run over ``folder``'s images."""
    from service.preprocessing import PreprocessSpec, preprocess_bytes
    from service.repository import read_card

    card = read_card(version_dir)
    spec = PreprocessSpec.from_card(card.get("preprocessing", {}))
    images = [path.read_bytes() for path in sorted(folder.iterdir())]

    def decode_all() -> None:
        for image in images:
            preprocess_bytes(image, spec, max_pixels=max_pixels)

    return float(np.median(_timed(decode_all, seconds, min_runs=3))) / len(images)


def inference_costs(
    version_dir: Path, settings: Settings, *, max_batch: int, seconds: float
) -> tuple[str, dict[int, float]]:
    """Core-seconds per image for batch sizes 1, 2, 4, … ``max_batch``, one thread, with
    the runtime the server would pick (``CNNSERVE_RUNTIME``); and that runtime's name."""
    from service.runtimes import create_runtime

    runtime = create_runtime(settings.runtime, version_dir, cache_dir=settings.cache_dir, threads=1)
    runtime.load()
    sizes = sorted({1, max_batch, *(2**i for i in range(11) if 2**i < max_batch)})
    rng = np.random.default_rng(0)
    costs = {}
    try:
        for size in sizes:
            batch = rng.integers(0, 256, (size, 224, 224, 3), dtype=np.uint8)
            per_run = seconds / len(sizes)
            times = _timed(lambda b=batch: runtime.predict(b), per_run)
            costs[size] = float(np.median(times)) / size
    finally:
        runtime.unload()
    return runtime.name, costs


def cost_at(costs: dict[int, float], batch: float) -> float:
    """Per-image inference cost at a (mean, fractional) batch size: linear between the
    measured sizes, clamped at both ends."""
    sizes = sorted(costs)
    if batch <= sizes[0]:
        return costs[sizes[0]]
    if batch >= sizes[-1]:
        return costs[sizes[-1]]
    i = bisect.bisect_left(sizes, batch)
    lo, hi = sizes[i - 1], sizes[i]
    w = (batch - lo) / (hi - lo)
    return costs[lo] * (1 - w) + costs[hi] * w


def limit(*, cores: float, http_s: float, decode_s: float, infer_s: float) -> dict[str, float]:
    per_request = http_s + decode_s + infer_s
    return {
        "limit_rps": round(cores / per_request, 1),
        "cores_for_server": round(cores, 2),
        "http_ms": round(http_s * 1e3, 3),
        "decode_ms": round(decode_s * 1e3, 3),
        "inference_ms": round(infer_s * 1e3, 3),
    }


if __name__ == "__main__":  # one decode measurement (_decode_in_process)
    folder_arg, version_arg, pixels_arg, seconds_arg, core_arg = sys.argv[1:6]
    if core_arg != "-":
        os.sched_setaffinity(0, {int(core_arg)})
    cost = _decode_alone(Path(folder_arg), Path(version_arg), int(pixels_arg), float(seconds_arg))
    sys.stdout.write(f"{cost!r}\n")
