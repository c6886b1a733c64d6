"""`cnnserve bench --overload`: what one replica does at several times the load it
serves, against the overload targets of docs/failure-modes.md.

One server (or ``--url``), the photo mix as raw bodies, then in turn:

1. **unloaded**: the probe alone, for its latency with nothing else running;
2. **capacity**: wrk alone at the first level (the saturating one, ``cnnserve bench``'s
   32 connections by default), for the goodput the others are measured against;
3. **each overload level**: wrk at that many connections, retrying every 503 at once,
   and beside it the probe (clients that pause before sending again, as ``Retry-After``
   asks: their admitted latency and their 503s), a spinner (a client retrying every
   503 at once, as wrk does: its 503s), readiness polled on new connections the way a
   kubelet does (on the probe port, CNNSERVE_PROBE_PORT, as docker/k8s probes it, and
   on the REST port beside it), and the server's resident memory; then a second with
   the load gone.

With ``protocol="grpc"`` the load, the probe and the spinner make ImageClassifier
Classify calls instead (:mod:`service.bench.grpc_load`): a level is that many calls in
flight, 16 a connection at most over 8 at least; readiness is still polled over REST, as a
kubelet does.

Each target is met or not, with the numbers; the run reports, it does not gate (the
spinner's 503s are paced by design, :mod:`service.concurrency`, and this box's noise
moves the rest). Every client here is Python on the same machine as the server: what
the clients see includes the wait for a core, as any client's on a loaded box would.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import math
import os
import random
import ssl
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from service.bench.process import Usage, started
from service.bench.wrk import Load, key_headers, run_wrk, write_bodies
from service.config import Settings
from service.launch import free_port, serve_command

if TYPE_CHECKING:  # it builds on this module (Sample, percentile): imported where used
    from service.bench import grpc_load

Progress = Callable[[str], None]

PROBE_THREADS = 2
# The probe's pause after each answer: longer than the server's "retrying at once"
# window (retry_at_once_seconds, 10 ms), as a client waiting before it retries is.
PROBE_PAUSE = 0.02
READINESS_EVERY = 0.1
READINESS_TIMEOUT = 1.0  # a kubelet probe's default timeout
RECOVERY_SECONDS = 1.0
# The first half second of a level is left out of its latencies: the limit adapts from
# the capacity level's within a few windows (0.1 s each).
SETTLE_SECONDS = 0.5
FEW_MS = 10.0  # "answered in a few ms"
GOODPUT_SHARE = 0.7
RSS_GROWTH = 1.1  # "flat": the last sample within this of the first
RECOVERED_SHARE = 0.95  # of the probe's answers in the second after the load: 200s
CLIENT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the run began, when the request was sent
    status: int  # 0: no answer (refused, reset, timed out)
    ms: float


@dataclass
class Client:
    """Requests on one keep-alive connection (reopened after a close or an error) until
    stopped: POST a random body of ``bodies`` (GET when there are none), then wait
    ``pause`` seconds (a 503's too), or reconnect for each request with ``fresh``."""

    url: str
    path: str
    bodies: list[bytes]
    pause: float
    origin: float
    fresh: bool = False
    timeout: float = CLIENT_TIMEOUT
    # The API key wrk sends too (service.bench.wrk.key_headers): a gateway with keys on
    # answered these clients 401, and the probe's numbers were of refusals.
    headers: dict[str, str] = field(default_factory=key_headers)
    samples: list[Sample] = field(default_factory=list)
    _target: str = ""

    def run(self, stop: threading.Event) -> None:
        parts = urlsplit(self.url)
        host = parts.hostname or "127.0.0.1"
        self._target = parts.path.rstrip("/") + self.path  # a prefix in --url, as wrk keeps
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            # Measuring, not trusting: wrk does not verify a certificate either.
            unverified = ssl._create_unverified_context()
            connection = http.client.HTTPSConnection(
                host, parts.port or 443, timeout=self.timeout, context=unverified
            )
        else:
            connection = http.client.HTTPConnection(host, parts.port or 80, timeout=self.timeout)
        rng = random.Random(id(self))
        try:
            while not stop.is_set():
                sent = time.monotonic()
                status = self._one(connection, rng)
                self.samples.append(
                    Sample(sent - self.origin, status, (time.monotonic() - sent) * 1e3)
                )
                if self.fresh or status == 0:
                    connection.close()
                if self.pause:
                    stop.wait(self.pause)
        finally:
            connection.close()

    def _one(self, connection: http.client.HTTPConnection, rng: random.Random) -> int:
        try:
            if self.bodies:
                body = rng.choice(self.bodies)
                headers = {**self.headers, "content-type": "image/jpeg"}
                connection.request("POST", self._target, body=body, headers=headers)
            else:
                connection.request("GET", self._target, headers=self.headers)
            response = connection.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            return 0


@contextmanager
def running(clients: Sequence[Client | grpc_load.GrpcClient]) -> Iterator[None]:
    stop = threading.Event()
    threads = [threading.Thread(target=c.run, args=(stop,), daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()


@dataclass(frozen=True)
class Plan:
    repository: Path
    model: str
    levels: list[int]  # the capacity level first, then the overload levels
    images: list[bytes] = field(repr=False)
    image_description: str
    workers: int
    seconds: float = 10.0
    warmup_seconds: float = 3.0
    url: str | None = None
    server_pid: int | None = None
    version: int | None = None  # None: the model's default routing
    protocol: str = "rest"  # or "grpc"
    grpc_target: str | None = None  # host:port, with url; else the server started's
    # Open-loop levels, after the others: these multiples of the capacity measured, in
    # requests a second (REST only: service.bench.open_loop).
    open_loop: list[float] = field(default_factory=list)
    # Where readiness is polled, with url: the gateway's probe port (CNNSERVE_PROBE_PORT),
    # as a kubelet of docker/k8s probes it; None: url. A server started here has one.
    probe_url: str | None = None


@dataclass(frozen=True)
class Traffic:
    """What a run sends, by protocol: the load at a level (wrk's or gRPC's), the polite
    and the spinning clients beside it."""

    describe: Callable[[int], str]  # a level, in words
    load: Callable[[int, float], dict[str, Any]]  # (level, seconds) -> run_wrk's numbers
    client: Callable[[float], Client | grpc_load.GrpcClient]  # pause -> a client
    # (requests a second, seconds) -> the same numbers, for an open loop; None: none here
    open_load: Callable[[float, float], dict[str, Any]] | None = None

    @staticmethod
    def rest(url: str, path: str, bodies: tuple[Path, ...], plan: Plan, origin: float) -> Traffic:
        from service.bench import open_loop

        load = Load(path, bodies=bodies)
        return Traffic(
            describe=lambda level: f"wrk at {level} connections",
            load=lambda level, seconds: run_wrk(url, load, connections=level, seconds=seconds),
            client=lambda pause: Client(url, path, plan.images, pause, origin),
            open_load=lambda rate, seconds: open_loop.run_load(
                url, path, bodies, rate=rate, seconds=seconds
            ),
        )

    @staticmethod
    def grpc(target: str, bodies: tuple[Path, ...], plan: Plan, origin: float) -> Traffic:
        from service.bench import grpc_load

        model, version = plan.model, plan.version
        return Traffic(
            describe=lambda level: (
                f"gRPC load at {level} calls in flight "
                f"({grpc_load.connections_for(level)} connections)"
            ),
            load=lambda level, seconds: grpc_load.run_load(
                target, model, version, bodies, calls=level, seconds=seconds
            ),
            client=lambda pause: grpc_load.GrpcClient(
                target, model, version, plan.images, pause, origin
            ),
        )


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def rounded_ms(value: float | None) -> float | None:
    """A latency in ms as the reports give it (0.01 ms), None for none."""
    return None if value is None else round(value, 2)


def _latencies(samples: list[Sample], start: float, end: float, status: int) -> list[float]:
    return [s.ms for s in samples if start <= s.at < end and s.status == status]


def run(plan: Plan, settings: Settings, progress: Progress) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cnnserve-overload-") as tmp:
        bodies = write_bodies(plan.images, Path(tmp) / "bodies")
        if plan.url:
            return _measure(
                plan, plan.url, plan.grpc_target, plan.server_pid, bodies, settings, progress
            )
        port = free_port()
        grpc_port = free_port() if plan.protocol == "grpc" else 0
        probe_port = next(p for p in iter(free_port, None) if p not in (port, grpc_port))
        url = f"http://127.0.0.1:{port}"
        cmd = serve_command(plan.repository, port, grpc_port, "--poll-seconds", "0")
        env = {
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "CNNSERVE_WORKERS": str(plan.workers),
            "CNNSERVE_PROBE_PORT": str(probe_port),
        }
        log = Path(tmp) / "gateway.log"
        target = f"127.0.0.1:{grpc_port}"
        plan = replace(plan, probe_url=f"http://127.0.0.1:{probe_port}")
        with started(cmd, env=os.environ | env, ready_url=url + "/readyz", log=log) as pid:
            return _measure(plan, url, target, pid, bodies, settings, progress)


def _measure(
    plan: Plan,
    url: str,
    grpc_target: str | None,
    pid: int | None,
    bodies: tuple[Path, ...],
    settings: Settings,
    progress: Progress,
) -> dict[str, Any]:
    path = f"/v1/classify?model={plan.model}"
    if plan.version is not None:
        path += f"&version={plan.version}"
    origin = time.monotonic()
    if plan.protocol == "grpc":
        if grpc_target is None:
            raise ValueError("a gRPC overload check needs the gRPC target")
        traffic = Traffic.grpc(grpc_target, bodies, plan, origin)
    else:
        traffic = Traffic.rest(url, path, bodies, plan, origin)
    capacity, *overloads = plan.levels
    progress(f"warm-up: {traffic.describe(capacity)}, {plan.warmup_seconds:g} s")
    traffic.load(capacity, plan.warmup_seconds)

    progress(f"unloaded: the probe alone, {plan.seconds:g} s")
    unloaded_clients = _probe(traffic)
    with running(unloaded_clients):
        time.sleep(plan.seconds)
    alone = [s.ms for c in unloaded_clients for s in c.samples if s.status == 200]
    unloaded = {f"p{q}_ms": rounded_ms(percentile(alone, q)) for q in (50, 99)}
    progress(f"  probe p50 {unloaded['p50_ms']} ms, p99 {unloaded['p99_ms']} ms")

    progress(f"capacity: {traffic.describe(capacity)}, {plan.seconds:g} s")
    saturating = traffic.load(capacity, plan.seconds)
    progress(f"  {saturating['requests_per_s']:.0f} req/s, statuses {saturating['statuses']}")

    unit = "calls in flight" if plan.protocol == "grpc" else "connections"
    capacity_rps = saturating["requests_per_s"]
    runs: list[tuple[dict[str, Any], str, Callable[[], dict[str, Any]]]] = [
        (
            {"connections": connections, "label": f"{connections} {unit}"},
            traffic.describe(connections),
            functools.partial(traffic.load, connections, plan.seconds),
        )
        for connections in overloads
    ]
    if plan.open_loop and capacity_rps <= 0:
        progress("  no open loop: the capacity level served nothing to multiply")
    for multiple in plan.open_loop if capacity_rps > 0 else []:
        if traffic.open_load is None:
            raise ValueError(f"no open-loop load over {plan.protocol}")
        rate = round(multiple * capacity_rps, 1)
        runs.append(
            (
                {
                    "connections": None,
                    "label": f"open loop {multiple:g}x ({rate:.0f}/s)",
                    "open_loop": {"multiple": multiple, "rate": rate},
                },
                f"an open loop at {multiple:g}x capacity, {rate:.0f} requests/s",
                functools.partial(traffic.open_load, rate, plan.seconds),
            )
        )
    levels = []
    for identity, described, load in runs:
        progress(f"overload: {described}, {plan.seconds:g} s, beside it")
        progress("  the probe, a spinner, readiness polls and the server's memory")
        checks = PaceChecks(plan.probe_url or url, settings.metrics_path)
        level = identity | _overload(url, plan.probe_url, traffic, load, pid, origin)
        level["pace_checks"] = checks.since()
        share = level["wrk"]["requests_per_s"] / capacity_rps if capacity_rps else 0.0
        level["goodput_share"] = round(share, 3)
        levels.append(level)
        progress(_line(level))
    budget_ms = settings.queue_wait_budget_seconds * 1e3
    return {
        "url": url,
        "protocol": plan.protocol,
        "level_unit": unit,
        "model": plan.model,
        "workers": plan.workers,
        "image": plan.image_description,
        "seconds_per_level": plan.seconds,
        "budget_ms": budget_ms,
        "unloaded": unloaded,
        "capacity": {"connections": capacity, **saturating},
        "levels": levels,
        "targets": targets(unloaded, levels, budget_ms),
    }


def _probe(traffic: Traffic) -> list[Client | grpc_load.GrpcClient]:
    """The polite clients: each pauses after every answer, its 503s too."""
    return [traffic.client(PROBE_PAUSE) for _ in range(PROBE_THREADS)]


def _overload(
    url: str,
    probe_url: str | None,
    traffic: Traffic,
    load: Callable[[], dict[str, Any]],
    pid: int | None,
    origin: float,
) -> dict[str, Any]:
    """One overload level: ``load`` with the probe, a spinner, readiness polls and the
    server's memory beside it, then a second with the load gone. Readiness is polled at
    ``probe_url`` (a probe port) when there is one, and on the REST port beside it."""
    polite = _probe(traffic)
    spinner = traffic.client(0.0)
    readiness, *rest_readiness = (
        Client(where, "/readyz", [], READINESS_EVERY, origin, True, READINESS_TIMEOUT)
        for where in ([probe_url, url] if probe_url and probe_url != url else [url])
    )
    usage = Usage(pid) if pid is not None else None
    with running([*polite, readiness, *rest_readiness]):
        began = time.monotonic() - origin
        with usage.measure() if usage else contextlib.nullcontext(), running([spinner]):
            result = load()
            ended = time.monotonic() - origin  # not once the spinner's last (paced) 503 is in
        if "window_monotonic" in result:  # a load from a process of its own: when it ran
            began, ended = (moment - origin for moment in result.pop("window_monotonic"))
        time.sleep(RECOVERY_SECONDS)
    probe = [s for c in polite for s in c.samples]
    during = (began + SETTLE_SECONDS, ended)
    after = (ended, ended + RECOVERY_SECONDS)
    statuses = Counter(str(s.status) for s in probe + spinner.samples if began <= s.at < ended)
    admitted = _latencies(probe, *during, 200)
    refused = _latencies(probe, *during, 503)
    spun = _latencies(spinner.samples, *during, 503)
    recovered = [s for s in probe if after[0] <= s.at < after[1]]
    ready = [s for s in readiness.samples if began <= s.at < ended]
    rest_ready = [s for c in rest_readiness for s in c.samples if began <= s.at < ended]
    rss = [b / 2**20 for b in usage.rss if b > 0] if usage else []
    return {
        "began_s": round(began, 2),
        "ended_s": round(ended, 2),
        "wrk": result,
        "clients_statuses": dict(statuses),
        "probe_200": {
            "count": len(admitted),
            "p50_ms": rounded_ms(percentile(admitted, 50)),
            "p99_ms": rounded_ms(percentile(admitted, 99)),
        },
        "probe_503_p50_ms": rounded_ms(percentile(refused, 50)),
        "probe_503_count": len(refused),
        "spinner_503_p50_ms": rounded_ms(percentile(spun, 50)),
        "spinner_503_p90_ms": rounded_ms(percentile(spun, 90)),
        "spinner_503_count": len(spun),
        "readiness": {"url": readiness.url, **_polls(ready)},
        # The REST port's, beside the probe port's: where a probe would have queued.
        "readiness_rest_port": _polls(rest_ready) if rest_readiness else None,
        "rss_mb": {
            "first": round(rss[0], 1) if rss else None,
            "last": round(rss[-1], 1) if rss else None,
            "peak": round(max(rss), 1) if rss else None,
        },
        "recovery": {
            "statuses": sorted({s.status for s in recovered}),
            "answers": len(recovered),
            "ok": sum(1 for s in recovered if s.status == 200),
            "p50_ms": rounded_ms(percentile([s.ms for s in recovered if s.status == 200], 50)),
        },
        "timeline": {
            "probe": [[round(s.at, 3), s.status, round(s.ms, 2)] for s in probe],
            "spinner": [[round(s.at, 3), s.status, round(s.ms, 2)] for s in spinner.samples],
            "readiness": [[round(s.at, 3), s.status, round(s.ms, 2)] for s in readiness.samples],
        },
    }


class PaceChecks:
    """The server's pace-check verdicts (cnnserve_refusal_pace_checks_total, by verdict:
    whether it let an open loop's refusals go, service.pace_check) from its metrics, so
    that a level's report says what the server made of its load; None where they cannot
    be read (no metrics path, a key refused, a server without them)."""

    def __init__(self, url: str, metrics_path: str) -> None:
        self.url, self.path = url, metrics_path
        self.before = self._read()

    def _read(self) -> dict[str, float] | None:
        from service.bench.sweep import scraped

        if not self.path:
            return None
        try:
            samples = scraped(self.url, self.path, "cnnserve_refusal_pace_checks")
        except (OSError, ValueError):
            return None
        counts: dict[str, float] = {}
        for sample in samples:
            if sample.name.endswith("_total"):
                verdict = sample.labels.get("verdict", "")
                counts[verdict] = counts.get(verdict, 0.0) + sample.value
        return counts

    def since(self) -> dict[str, int] | None:
        """Each verdict's count since this was made."""
        after = self._read()
        if self.before is None or after is None:
            return None
        # A verdict never given has no sample yet.
        verdicts = sorted({"closed_loop", "many_refusals", "open_loop", *after})
        return {v: round(after.get(v, 0.0) - self.before.get(v, 0.0)) for v in verdicts}


def _polls(samples: list[Sample]) -> dict[str, int]:
    return {"polls": len(samples), "not_ready": sum(1 for s in samples if s.status != 200)}


def _on_the_rest_port(polls: dict[str, int] | None) -> str:
    if polls is None:
        return ""
    return f" (on the REST port: {polls['not_ready']} of {polls['polls']})"


def _line(level: dict[str, Any]) -> str:
    wrk = level["wrk"]
    return (
        f"  {wrk['requests_per_s']:.0f} req/s ({level['goodput_share']:.0%} of capacity), "
        f"statuses {wrk['statuses']}, probe p99 {level['probe_200']['p99_ms']} ms, "
        f"503 p50: polite {level['probe_503_p50_ms']} ms, spinning "
        f"{level['spinner_503_p50_ms']} ms"
        + (
            f", the load's own {wrk['refused_p50_ms']} ms (p90 {wrk['refused_p90_ms']} ms); "
            f"sent {wrk['sent_per_s']:.0f}/s on {wrk['connections_opened']} connections"
            if "open_loop" in level
            else ""
        )
        + (f"; pace checks {level['pace_checks']}" if level.get("pace_checks") else "")
    )


def targets(
    unloaded: dict[str, Any], levels: list[dict[str, Any]], budget_ms: float
) -> list[dict[str, Any]]:
    """Each level's targets: met (True/False; None when nothing measured it), with the
    numbers that decided it."""
    return [
        {
            "connections": level["connections"],  # None for an open loop
            "level": level.get("label", f"{level['connections']} connections"),
            "target": name,
            "met": met,
            "measured": measured,
        }
        for level in levels
        for name, met, measured in _level_targets(unloaded, level, budget_ms)
    ]


def _level_targets(
    unloaded: dict[str, Any], level: dict[str, Any], budget_ms: float
) -> list[tuple[str, bool | None, str]]:
    rows: list[tuple[str, bool | None, str]] = []
    wrk = level["wrk"]
    answered = set(wrk["statuses"]) | set(level["clients_statuses"])
    socket_errors = {k: v for k, v in wrk["errors"].items() if not k.isdigit()}
    bound = None
    if unloaded["p99_ms"] is not None:
        bound = round(2 * unloaded["p99_ms"] + budget_ms, 1)
    p99 = level["probe_200"]["p99_ms"]
    rss = level["rss_mb"]
    recovery = level["recovery"]
    rows.append(
        (
            "only 200s and 503s",
            answered <= {"200", "503"} and not socket_errors,
            f"statuses {sorted(answered)}, socket errors {socket_errors or 'none'}",
        )
    )
    rows.append(
        (
            f"goodput >= {GOODPUT_SHARE:.0%} of capacity",
            level["goodput_share"] >= GOODPUT_SHARE,
            f"{level['goodput_share']:.0%}",
        )
    )
    rows.append(
        (
            "admitted p99 <= 2 x unloaded p99 + budget",
            None if p99 is None or bound is None else p99 <= bound,
            f"{p99} ms against {bound} ms",
        )
    )
    for who, key in (("polite", "probe_503_p50_ms"), ("spinning", "spinner_503_p50_ms")):
        value = level[key]
        rows.append(
            (
                f"503 p50 <= {FEW_MS:g} ms ({who} client)",
                None if value is None else value <= FEW_MS,
                "no 503" if value is None else f"{value} ms",
            )
        )
    rows.append(
        (
            "readiness kept",
            level["readiness"]["polls"] > 0 and not level["readiness"]["not_ready"],
            f"{level['readiness']['not_ready']} of {level['readiness']['polls']} polls not 200"
            + _on_the_rest_port(level.get("readiness_rest_port")),
        )
    )
    rows.append(
        (
            "resident memory flat",
            None if rss["first"] is None else rss["last"] <= rss["first"] * RSS_GROWTH,
            "not measured (no pid)"
            if rss["first"] is None
            else f"{rss['first']} → {rss['last']} MiB (peak {rss['peak']})",
        )
    )
    if "open_loop" in level:
        rows += _open_loop_targets(wrk)
    recovered_p50 = recovery["p50_ms"]
    full_speed = None
    if recovered_p50 is not None and unloaded["p50_ms"] is not None:
        # The load's last requests may still hold places as the probe's first arrive.
        admitted = recovery["ok"] >= RECOVERED_SHARE * recovery["answers"]
        full_speed = admitted and recovered_p50 <= 2 * unloaded["p50_ms"]
    rows.append(
        (
            f"full speed within {RECOVERY_SECONDS:g} s of the load's end",
            full_speed,
            f"{recovery['ok']} of {recovery['answers']} answers 200, p50 {recovered_p50} ms "
            f"(unloaded {unloaded['p50_ms']} ms)",
        )
    )
    return rows


def _open_loop_targets(load: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """An open loop's own: its refusals answered in a few ms, and whether the generator
    kept the rate (if not, the level measured a slower load than it says)."""
    from service.bench.open_loop import LATE_MS, kept_rate

    refused = load["refused_p50_ms"]
    return [
        (
            f"503 p50 <= {FEW_MS:g} ms (open-loop load)",
            None if refused is None else refused <= FEW_MS,
            "no 503" if refused is None else f"{refused} ms (p90 {load['refused_p90_ms']} ms)",
        ),
        (
            "the generator kept the rate",
            kept_rate(load),
            f"sent {load['sent_per_s']:.0f} of {load['rate']:.0f} a second, "
            f"{load['late_share']:.1%} more than {LATE_MS:g} ms late",
        ),
    ]
