"""The sweep: one server per (workers, batching) setting, wrk at each concurrency level.

Each point records req/s, latency percentiles, errors by status, the server's CPU and
peak RSS, the batch size the server formed, and the physical limit beside it
(:mod:`service.bench.limits`). The peers under ``loadtests/`` (the tutorial-style
server, one TensorFlow call per request, and the batching TensorFlow server) take the
same load in the same run, and the report ends with the gateway's req/s over each
peer's at each concurrency.

The load is one image (``--payload fashion``) or the photo mix (``--payload photos``,
:mod:`service.bench.photos`): every request a random one of 200 JPEGs.
"""

from __future__ import annotations

import io
import os
import ssl
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import numpy as np
from PIL import Image

from service.bench.limits import cost_at, decode_cost, inference_costs, limit
from service.bench.photos import photo_mix
from service.bench.process import Usage, started
from service.bench.wrk import Load, key_headers, run_wrk, write_bodies
from service.config import Settings
from service.launch import free_port, serve_command

if TYPE_CHECKING:
    from prometheus_client.samples import Sample

Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@dataclass(frozen=True)
class Batching:
    """The batcher's knobs, named as TF Serving's BatchingParameters."""

    max_batch_size: int
    batch_timeout_micros: int
    num_batch_threads: int

    @classmethod
    def parse(cls, text: str) -> Batching:
        """``"32:1000:2"`` = max_batch_size:batch_timeout_micros:num_batch_threads."""
        parts = [int(p) for p in text.split(":")]
        if len(parts) != 3:
            raise ValueError(f"batching {text!r}: expected max_batch:timeout_us:threads")
        batching = cls(*parts)
        if min(batching.max_batch_size, batching.num_batch_threads) < 1:
            raise ValueError(f"batching {text!r}: a batch size and threads of at least 1")
        if batching.batch_timeout_micros < 0:
            raise ValueError(f"batching {text!r}: a timeout of at least 0")
        return batching

    @classmethod
    def of(cls, settings: Settings) -> Batching:
        return cls(
            settings.max_batch_size, settings.batch_timeout_micros, settings.num_batch_threads
        )

    def env(self) -> dict[str, str]:
        return {f"CNNSERVE_{k.upper()}": str(v) for k, v in asdict(self).items()}

    def label(self) -> str:
        return f"{self.max_batch_size}/{self.batch_timeout_micros}us/{self.num_batch_threads}t"


@dataclass(frozen=True)
class ServerConfig:
    workers: int
    batching: Batching

    def label(self) -> str:
        return f"{self.workers}w {self.batching.label()}"


@dataclass(frozen=True)
class Payload:
    """The request bodies (one or many JPEGs) and how the report names them."""

    name: str
    images: list[bytes] = field(repr=False)
    description: str


PAYLOADS = ("photos", "fashion")


def make_payload(name: str, fashion_mnist_dir: Path) -> Payload:
    if name == "photos":
        mix = photo_mix()
        return Payload(name, mix.images, mix.describe())
    if name == "fashion":
        image = sample_image(fashion_mnist_dir)
        return Payload(name, [image], f"224x224 JPEG, {len(image)} bytes, raw body (image/jpeg)")
    raise ValueError(f"unknown payload {name!r}; use {', '.join(PAYLOADS)}")


@dataclass(frozen=True)
class Peer:
    """A server the gateway is compared with (a script under loadtests/)."""

    key: str  # reference | batching_reference
    label: str
    script: Path
    workers: int


@dataclass
class Plan:
    repository: Path
    version_dir: Path
    concurrency: list[int]
    configs: list[ServerConfig]
    seconds: float = 10.0
    warmup_seconds: float = 2.0
    limit_seconds: float = 3.0
    peers: list[Peer] = field(default_factory=list)
    url: str | None = None  # drive a running gateway instead of starting one
    server_pid: int | None = None  # its pid, for CPU and RSS (optional)
    payload: Payload = field(default_factory=lambda: Payload("none", [], ""), repr=False)
    # Before measuring: the gateway's top-5 on a few payload images against TensorFlow's
    # (:func:`service.bench.mobilenet.check_answers`); the run fails when they differ.
    check_answers: int = 0


def sample_image(fashion_mnist_dir: Path) -> bytes:
    """A Fashion-MNIST test image upscaled to a 224×224 JPEG (q90); noise without it."""
    try:
        from service.training.data import load_fashion_mnist

        _, test = load_fashion_mnist(fashion_mnist_dir)
        assert test.pixels is not None
        img = Image.fromarray(test.pixels[0]).convert("RGB").resize((224, 224))
    except Exception:  # no dataset: any 224×224 picture does for timing
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def scraped(url: str, metrics_path: str, family: str) -> list[Sample]:
    """The samples of the metric ``family`` on the server's Prometheus endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    # The key, for CNNSERVE_METRICS_REQUIRE_KEY; measuring, not trusting: as wrk, no
    # certificate check (a self-signed --url gateway failed here, after its checks).
    request = urllib.request.Request(url + metrics_path, headers=key_headers())
    unverified = ssl._create_unverified_context() if url.startswith("https://") else None
    with urllib.request.urlopen(request, timeout=10, context=unverified) as response:
        text = response.read().decode()
    return [
        sample
        for found in text_string_to_metric_families(text)
        if found.name == family
        for sample in found.samples
    ]


def served_batches(url: str, metrics_path: str) -> tuple[float, float]:
    """(images, batches) the server has run so far, from its Prometheus endpoint."""
    samples = scraped(url, metrics_path, "cnnserve_batch_size")
    total = sum(s.value for s in samples if s.name.endswith("_sum"))
    count = sum(s.value for s in samples if s.name.endswith("_count"))
    return total, count


def _point(url: str, load: Load, c: int, seconds: float, pid: int | None) -> dict[str, Any]:
    if pid is None:
        return run_wrk(url, load, connections=c, seconds=seconds) | {"connections": c}
    usage = Usage(pid)
    with usage.measure():
        result = run_wrk(url, load, connections=c, seconds=seconds)
    return result | usage.as_dict() | {"connections": c, "server_cpu_s": round(usage.cpu_s, 2)}


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def classify_path(plan: Plan) -> str:
    """What wrk posts to: the version this bench reports and takes its limits from, by
    number. The default route answered with whatever the gateway served (a --url
    gateway's labelled version 1, while the report said version 2)."""
    model, version = plan.version_dir.parent.name, plan.version_dir.name
    return f"/v1/classify?{urlencode({'model': model, 'version': version})}"


def _measure_gateway(
    plan: Plan,
    config: ServerConfig,
    url: str,
    pid: int | None,
    settings: Settings,
    costs: dict[str, Any],
    progress: Progress,
) -> dict[str, Any]:
    classify = Load(classify_path(plan), bodies=costs["bodies"])
    top = max(plan.concurrency)
    run_wrk(url, classify, connections=top, seconds=plan.warmup_seconds)
    http = _point(url, Load("/healthz"), top, plan.limit_seconds, pid)
    if pid is not None and http["ok"]:
        http_s = http["server_cpu_s"] / http["ok"]
    else:  # no pid: the stack's throughput on every core bounds its cost from above
        http_s = _cores() / max(http["requests_per_s"], 1.0)
    progress(f"  HTTP alone (GET /healthz, c={top}): {http['requests_per_s']:.0f} req/s")
    points = []
    for c in plan.concurrency:
        images0, batches0 = served_batches(url, settings.metrics_path)
        point = _point(url, classify, c, plan.seconds, pid)
        images1, batches1 = served_batches(url, settings.metrics_path)
        batch = (images1 - images0) / (batches1 - batches0) if batches1 > batches0 else 1.0
        cores = max(0.1, _cores() - point["generator_cores"])
        point.update(
            {
                "workers": config.workers,
                **asdict(config.batching),
                "served_batch": round(batch, 2),
                **limit(
                    cores=cores,
                    http_s=http_s,
                    decode_s=costs["decode_s"],
                    infer_s=cost_at(costs["inference_s"], batch),
                ),
            }
        )
        point["efficiency"] = round(point["requests_per_s"] / point["limit_rps"], 3)
        if point.get("server_cpu_s") and point["ok"]:
            # CPU per request against the parts' sum: unlike req/s, barely moved by other
            # work on a shared box (it counts only the server's own CPU time).
            cpu_ms = point["server_cpu_s"] * 1e3 / point["ok"]
            parts_ms = point["http_ms"] + point["decode_ms"] + point["inference_ms"]
            point["cpu_ms_per_request"] = round(cpu_ms, 3)
            point["cpu_efficiency"] = round(parts_ms / cpu_ms, 3)
        points.append(point)
        progress(_line(config.label(), point))
    return {"config": config.label(), "http_alone": http, "points": points}


def _line(label: str, p: dict[str, Any]) -> str:
    errors = sum(p["errors"].values())
    extra = f", efficiency {p['efficiency']:.0%}" if "efficiency" in p else ""
    if "cpu_efficiency" in p:
        cpu = p["cpu_ms_per_request"]
        extra += f" ({cpu:.2f} ms CPU/req, {p['cpu_efficiency']:.0%} of it in the parts)"
    return (
        f"  {label} c={p['connections']}: {p['requests_per_s']:.0f} req/s, "
        f"p50 {p['p50_ms']:.1f} ms, p99 {p['p99_ms']:.1f} ms, {errors} errors{extra}"
    )


def _gateway_env(config: ServerConfig) -> dict[str, str]:
    return {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "CNNSERVE_WORKERS": str(config.workers),
        **config.batching.env(),
    }


def run(plan: Plan, settings: Settings, progress: Progress = _stderr) -> dict[str, Any]:
    """Measure every point of ``plan``; returns the report (see docs/performance.md)."""
    started_at = time.time()
    with tempfile.TemporaryDirectory(prefix="cnnserve-bench-") as tmp:
        bodies = write_bodies(plan.payload.images, Path(tmp) / "bodies")
        max_batch = max(c.batching.max_batch_size for c in plan.configs)
        progress(f"limits: decode + resize and inference alone ({plan.version_dir})")
        runtime, inference = inference_costs(
            plan.version_dir, settings, max_batch=max_batch, seconds=plan.limit_seconds
        )
        costs: dict[str, Any] = {
            "bodies": bodies,
            "decode_s": decode_cost(
                plan.payload.images, plan.version_dir, settings, plan.limit_seconds
            ),
            "inference_s": inference,
        }
        answers = None
        runs = []
        for i, config in enumerate(plan.configs, 1):
            progress(f"[{i}/{len(plan.configs)}] gateway {config.label()}")
            if plan.url:
                if plan.check_answers and answers is None:
                    answers = _check_answers(plan, plan.url, settings, progress)
                runs.append(
                    _measure_gateway(
                        plan, config, plan.url, plan.server_pid, settings, costs, progress
                    )
                )
                continue
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = serve_command(plan.repository, port, 0, "--poll-seconds", "0")
            log = Path(tmp) / f"gateway-{i}.log"
            with started(cmd, env=_gateway_env(config), ready_url=url + "/readyz", log=log) as pid:
                if plan.check_answers and answers is None:
                    answers = _check_answers(plan, url, settings, progress)
                runs.append(_measure_gateway(plan, config, url, pid, settings, costs, progress))
        peers = []
        for peer in plan.peers:
            try:
                peers.append(_measure_peer(plan, peer, bodies, progress))
            except RuntimeError as exc:  # the gateway's numbers still count
                progress(f"{peer.label} failed: {exc}")
                peers.append(_peer_record(peer) | {"error": str(exc), "points": []})
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "cores": _cores(),
        "payload": plan.payload.name,
        "image": plan.payload.description,
        "median_image_bytes": int(np.median([len(x) for x in plan.payload.images])),
        "seconds_per_point": plan.seconds,
        "answers": answers,
        "limits": {
            "decode_ms": round(costs["decode_s"] * 1e3, 3),
            "inference_ms_per_image": {
                str(b): round(s * 1e3, 3) for b, s in costs["inference_s"].items()
            },
            "runtime": runtime,
        },
        "runs": runs,
        "peers": peers,
        "side_by_side": side_by_side(runs, peers),
    }


def _check_answers(plan: Plan, url: str, settings: Settings, progress: Progress) -> dict[str, Any]:
    from service.bench.mobilenet import check_answers

    images = plan.payload.images[: plan.check_answers]
    answers = check_answers(url, plan.version_dir, images, settings)
    progress(
        f"answers: the gateway's top-{answers['top_k']} on {answers['images']} images equal "
        f"TensorFlow's (identical order on {answers['top5_identical']}, max score difference "
        f"{answers['max_score_diff']:.2g} <= {answers['tolerance']:g})"
    )
    return answers


def side_by_side(runs: list[dict[str, Any]], peers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each gateway setting and concurrency: its req/s over each peer's, measured in
    the same run (None where a peer served nothing)."""
    rows = []
    for run in runs:
        for point in run["points"]:
            c = point["connections"]
            row: dict[str, Any] = {
                "config": run["config"],
                "connections": c,
                "gateway_rps": point["requests_per_s"],
            }
            for peer in peers:
                theirs = next((p for p in peer["points"] if p["connections"] == c), None)
                rps = theirs["requests_per_s"] if theirs else 0.0
                row[f"{peer['key']}_rps"] = rps
                row[f"vs_{peer['key']}"] = (
                    round(point["requests_per_s"] / rps, 2) if rps > 0 else None
                )
            rows.append(row)
    return rows


def _peer_record(peer: Peer) -> dict[str, Any]:
    return {
        "key": peer.key,
        "label": peer.label,
        "server": str(peer.script),
        "workers": peer.workers,
    }


def _measure_peer(
    plan: Plan, peer: Peer, bodies: tuple[Path, ...], progress: Progress
) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        str(peer.script),
        "--model-dir",
        str(plan.version_dir),
        "--port",
        str(port),
        "--workers",
        str(peer.workers),
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    progress(f"{peer.label} ({peer.script.name}, {peer.workers} worker(s))")
    load = Load("/v1/classify", bodies=bodies)
    points = []
    with tempfile.TemporaryDirectory(prefix="cnnserve-peer-") as tmp:
        log = Path(tmp) / f"{peer.key}.log"
        with started(cmd, env=env, ready_url=url + "/healthz", log=log) as pid:
            run_wrk(url, load, connections=max(plan.concurrency), seconds=plan.warmup_seconds)
            for c in plan.concurrency:
                point = _point(url, load, c, plan.seconds, pid)
                point["served_batch"] = point.pop("header_batch", 1.0)
                if point.get("server_cpu_s") and point["ok"]:
                    point["cpu_ms_per_request"] = round(
                        point["server_cpu_s"] * 1e3 / point["ok"], 3
                    )
                points.append(point)
                progress(_line(peer.key, point))
    return _peer_record(peer) | {"points": points}
