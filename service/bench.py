"""`cnnserve bench`: throughput and latency numbers, reported with how they were made.

Two parts: ``runtimes`` times each in-process runtime on one model version at several
batch sizes (the table behind the default runtime choice), and ``http`` starts a real
server and drives it with wrk (C, so the load generator costs little CPU) posting a
224×224 JPEG as a raw body, then reports requests/s and latency percentiles.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.launch import free_port, serve_command, wait_for


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


def _sample_jpeg() -> bytes:
    from service.training.data import load_fashion_mnist

    try:
        _, test = load_fashion_mnist(Path("/usr/share/datasets/fashion-mnist"))
        assert test.pixels is not None
        img = Image.fromarray(test.pixels[0]).convert("RGB").resize((224, 224))
    except Exception:  # no dataset: any 224×224 picture does for timing
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/jpeg"
local f = io.open("{path}", "rb")
wrk.body = f:read("*all")
f:close()
"""


def _parse_wrk(output: str) -> dict[str, Any]:
    def ms(value: str) -> float:
        number, unit = re.match(r"([\d.]+)(\w+)", value).groups()  # type: ignore[union-attr]
        return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    result: dict[str, Any] = {}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    result["requests_per_s"] = float(rps.group(1)) if rps else None
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", output, re.MULTILINE)
        result[f"p{pct}_ms"] = ms(m.group(1)) if m else None
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["non_2xx"] = int(errors.group(1)) if errors else 0
    socket_errors = re.search(r"Socket errors: (.*)", output)
    result["socket_errors"] = socket_errors.group(1) if socket_errors else ""
    total = re.search(r"(\d+) requests in", output)
    result["requests"] = int(total.group(1)) if total else None
    return result


def bench_http(
    repository: Path, *, workers: int, connections: int, seconds: int, extra_env: dict[str, str]
) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed; `make bench` installs the Debian package 'wrk'")
    port = free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CNNSERVE_WORKERS": str(workers), **extra_env}
    cmd = serve_command(repository, port, 0, "--poll-seconds", "0")
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image.jpg"
        image.write_bytes(_sample_jpeg())
        script = Path(tmp) / "post.lua"
        script.write_text(WRK_SCRIPT.format(path=image))
        log = Path(tmp) / "server.log"
        with log.open("wb") as out:
            server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(url + "/readyz", server)
            threads = max(1, min(2, connections))
            common = [
                wrk,
                "-t",
                str(threads),
                "-c",
                str(connections),
                "--latency",
                "-s",
                str(script),
            ]
            subprocess.run(
                [*common, "-d", "3s", url + "/v1/classify"], capture_output=True, check=True
            )
            run = subprocess.run(
                [*common, "-d", f"{seconds}s", url + "/v1/classify"],
                capture_output=True,
                text=True,
                check=True,
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = _parse_wrk(run.stdout)
    result.update(
        {
            "workers": workers,
            "connections": connections,
            "seconds": seconds,
            "image": "224x224 JPEG, raw body",
            "wrk_command": " ".join(common[1:]),
        }
    )
    return result


def report(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
