"""Drive HTTP load with wrk and read its results as JSON.

wrk is a compiled generator (C + LuaJIT), so on a small box it takes far less CPU from
the server than a Python generator would. Its Lua ``done()`` hook writes the summary,
latency percentiles and per-status counts as one JSON document into a file, so nothing
here reads wrk's human-readable text. wrk's own CPU time is taken from the kernel
(``wait4``), so the report can say how many cores the generator took from the server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PERCENTILES = ("50", "90", "99", "99.9")

# One Lua state per wrk thread: each counts statuses in `statuses` (and the batch sizes a
# peer reports in an X-Batch-Size header); done() runs in the main state and collects them
# with thread:get (wrk copies tables between states).
LUA = """
wrk.method = "{method}"
{headers}
{setup_body}
local threads = {{}}
function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end
function init(args)
  statuses = {{}}
  batch_sum, batch_count = 0, 0
{init_body}
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  local batch = headers["x-batch-size"] or headers["X-Batch-Size"]
  if batch then
    batch_sum = batch_sum + tonumber(batch)
    batch_count = batch_count + 1
  end
end
function done(summary, latency, requests)
  local counts = {{}}
  local batch_sum, batch_count = 0, 0
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("statuses")) do
      counts[status] = (counts[status] or 0) + n
    end
    batch_sum = batch_sum + t:get("batch_sum")
    batch_count = batch_count + t:get("batch_count")
  end
  local by_status = {{}}
  for status, n in pairs(counts) do
    table.insert(by_status, string.format('"%d": %d', status, n))
  end
  local pct = {{}}
  for _, p in ipairs({{50, 90, 99, 99.9}}) do
    table.insert(pct, string.format('"%s": %d', tostring(p), latency:percentile(p)))
  end
  local e = summary.errors
  local f = io.open("{out}", "w")
  f:write(string.format(
    '{{"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {{"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}, ' ..
    '"statuses": {{%s}}, "latency_us": {{"mean": %.1f, "max": %d, "percentiles": {{%s}}}}, ' ..
    '"batch_header": {{"sum": %d, "count": %d}}}}',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(by_status, ", "), latency.mean, latency.max, table.concat(pct, ", "),
    batch_sum, batch_count))
  f:close()
end
"""

# POST bodies: every file is read once in init() and formatted into a whole request;
# request() sends a random one, so connections carry varied bodies (each thread seeds
# its own generator with its number, so threads do not send the same sequence).
POST_BODIES = """
local paths = {{{paths}}}
local prepared = {{}}
function request()
  return prepared[math.random(#prepared)]
end
"""

POST_INIT = """
  math.randomseed(id)
  for i, path in ipairs(paths) do
    local f = io.open(path, "rb")
    local body = f:read("*all")
    f:close()
    prepared[i] = wrk.format("POST", nil, {{["Content-Type"] = "{content_type}"{headers}}}, body)
  end
"""


class KeyRefused(RuntimeError):
    """The server answered 401 or 403: the numbers would measure refusals."""


def wrk_binary() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed; `make bench` installs the Debian package 'wrk'")
    return wrk


@dataclass(frozen=True)
class Load:
    """What wrk sends: GET ``path``, or POST one of the files ``bodies`` per request (a
    random one each time) with ``content_type``."""

    path: str
    bodies: tuple[Path, ...] = ()
    content_type: str = "image/jpeg"

    def script(self, out: Path, headers: Mapping[str, str] | None = None) -> str:
        """The Lua script; ``headers`` go with every request (an API key)."""
        headers = headers or {}
        # Keys are visible ASCII (service.config): JSON's escapes are Lua's there.
        pairs = [(json.dumps(name), json.dumps(value)) for name, value in headers.items()]
        if not self.bodies:
            return LUA.format(
                method="GET",
                headers="\n".join(f"wrk.headers[{n}] = {v}" for n, v in pairs),
                setup_body="",
                init_body="",
                out=out,
            )
        paths = ", ".join(json.dumps(str(p)) for p in self.bodies)
        return LUA.format(
            method="POST",
            headers="",  # wrk.format() with a table of its own leaves wrk.headers out
            setup_body=POST_BODIES.format(paths=paths),
            init_body=POST_INIT.format(
                content_type=self.content_type,
                headers="".join(f", [{n}] = {v}" for n, v in pairs),
            ),
            out=out,
        )


def write_bodies(images: list[bytes], folder: Path) -> tuple[Path, ...]:
    """The request bodies as files in ``folder`` (made here), for :class:`Load`."""
    folder.mkdir(parents=True)
    paths = tuple(folder / f"body-{i:03d}.jpg" for i in range(len(images)))
    for path, data in zip(paths, images, strict=True):
        path.write_bytes(data)
    return paths


def key_headers() -> dict[str, str]:
    """The API key of the command's own environment (CNNSERVE_API_KEYS or its file), as
    `verify` and `promote` send it: the gateways bench starts read the same environment,
    and a --url gateway with keys answered every request 401. Read for each run, so a
    rotated key file is followed."""
    from service.client_trust import api_key_headers
    from service.config import Settings

    return api_key_headers(Settings())


def run_wrk(url: str, load: Load, *, connections: int, seconds: float) -> dict[str, Any]:
    """One wrk run; returns req/s, latency percentiles (ms), errors, statuses, wrk's CPU.
    Raises KeyRefused when the server answered 401 or 403."""
    threads = max(1, min(2, connections))
    with tempfile.TemporaryDirectory(prefix="cnnserve-wrk-") as tmp:  # 0700: the key
        out = Path(tmp) / "result.json"
        script = Path(tmp) / "load.lua"
        script.write_text(load.script(out, key_headers()))
        cmd = [
            wrk_binary(),
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url.rstrip("/") + load.path,
        ]
        started = time.monotonic()
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        if process.returncode != 0 or not out.exists():
            raise RuntimeError(f"wrk failed ({process.returncode}): {stderr.strip()}")
        raw = json.loads(out.read_text())
    refused = key_refusals(raw["statuses"])
    if refused:
        raise KeyRefused(
            f"{url.rstrip('/')}{load.path} answered {_counts(refused)} of {raw['requests']} "
            "requests: bench sends the first key of its own CNNSERVE_API_KEYS or "
            "CNNSERVE_API_KEYS_FILE; give it one the gateway knows"
        )
    return summarize(raw, wrk_cpu_s=usage.ru_utime + usage.ru_stime, wall_s=wall) | {
        "wrk": f"wrk -t {threads} -c {connections} -d {max(1, round(seconds))}s",
    }


def generator_result(cmd: list[str], timeout: float, what: str) -> dict[str, Any]:
    """What a load generator run as a process of its own prints, as JSON
    (service.bench.open_loop, service.bench.grpc_load); RuntimeError with its stderr,
    naming ``what``, when it failed."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the {what} failed ({done.returncode}): {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def key_refusals(statuses: Mapping[Any, int]) -> dict[str, int]:
    """The 401s and 403s among a load's ``statuses``: the gateway refused the key."""
    return {str(s): n for s, n in statuses.items() if str(s) in ("401", "403")}


def summarize(raw: dict[str, Any], *, wrk_cpu_s: float, wall_s: float) -> dict[str, Any]:
    """wrk's JSON → the numbers a report shows (milliseconds, req/s, error counts)."""
    duration = raw["duration_us"] / 1e6
    statuses = {str(k): int(v) for k, v in raw["statuses"].items()}
    errors = {k: int(v) for k, v in raw["errors"].items() if k != "status" and v}
    errors.update({s: n for s, n in statuses.items() if not 200 <= int(s) < 400})
    ok = sum(n for s, n in statuses.items() if 200 <= int(s) < 400)
    pct = raw["latency_us"]["percentiles"]
    return {
        "requests": raw["requests"],
        "ok": ok,
        "requests_per_s": round(ok / duration, 1) if duration else 0.0,
        **{f"p{p}_ms": round(pct[p] / 1e3, 2) for p in PERCENTILES},
        "mean_ms": round(raw["latency_us"]["mean"] / 1e3, 2),
        "max_ms": round(raw["latency_us"]["max"] / 1e3, 2),
        "errors": errors,
        "statuses": statuses,
        "seconds": round(duration, 2),
        "generator_cores": round(wrk_cpu_s / wall_s, 2) if wall_s else 0.0,
    } | _header_batch(raw)


def _header_batch(raw: dict[str, Any]) -> dict[str, float]:
    """The mean batch size a server reported in X-Batch-Size headers, when it did."""
    batch = raw.get("batch_header") or {}
    if not batch.get("count"):
        return {}
    return {"header_batch": round(batch["sum"] / batch["count"], 2)}


def _counts(statuses: Mapping[str, int]) -> str:
    return " and ".join(f"{status} to {n}" for status, n in sorted(statuses.items()))
