"""`cnnserve bench`: the load sweep beside the physical limit (parser and handler).
Kept apart from :mod:`service.cli` so that each module stays one job; ``cli`` adds it."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli_rollout import add_ca_cert, unwritable_folder
from service.cli_types import (
    NON_NEGATIVE,
    POSITIVE,
    DefaultsHelp,
    model_name,
    multiples,
    positive_ints,
)
from service.client_trust import api_key_headers, https_verify, untrusted
from service.config import Settings
from service.errors import DatasetError

if TYPE_CHECKING:  # the sweep imports numpy and more: not for `--help`
    import httpx

    from service.bench.sweep import Batching


def batchings(text: str) -> list[Batching]:
    """--batching's settings, parsed (and checked) by the sweep's own parser."""
    from service.bench.sweep import Batching

    try:
        return [Batching.parse(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give max_batch_size:batch_timeout_micros:num_batch_threads, "
            "e.g. 32:1000:1 (a batch size and threads of at least 1)"
        ) from None


def add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser], settings: Settings) -> None:
    p = sub.add_parser(
        "bench",
        help="sweep load on the gateway with wrk, beside its physical limit",
        description="Starts the gateway for each workers x batching setting (or drives "
        "--url) and runs wrk at each concurrency level posting 224x224 JPEGs; measures "
        "HTTP, decode + resize and inference alone for the physical limit; runs the "
        "tutorial-style and the batching TensorFlow reference servers under the same load; "
        "writes JSON and a PNG, the gateway's req/s over each peer's, and recommends "
        "batching settings for --slo-p99-ms.",
        formatter_class=DefaultsHelp,
    )
    p.add_argument("--model-repository", type=Path, default=settings.model_repository)
    p.add_argument("--model", type=model_name, default="fashion_mnist")
    p.add_argument("--version", type=int, default=None, help="default: newest")
    p.add_argument(
        "--model-kind",
        choices=("repository", "mobilenet_v3_small"),
        default="repository",
        help="repository: --model from --model-repository; mobilenet_v3_small: build "
        "keras.applications.MobileNetV3Small (weights=None, seeded, 1000 classes, uint8 "
        "input, float LiteRT) into a temporary repository and check the gateway's answers "
        "against TensorFlow's before measuring",
    )
    p.add_argument(
        "--payload",
        choices=("fashion", "photos"),
        default="fashion",
        help="fashion: one upscaled Fashion-MNIST JPEG; photos: a random one of 200 "
        "photo-like 224x224 JPEGs (~10 KiB) per request",
    )
    p.add_argument(
        "--concurrency", type=positive_ints, default="1,8,32,64", help="wrk connections per point"
    )
    p.add_argument(
        "--workers",
        type=positive_ints,
        default=str(settings.workers),
        help="worker counts, e.g. 1,2",
    )
    p.add_argument(
        "--batching",
        type=batchings,
        default=None,
        help="settings to sweep as max_batch_size:batch_timeout_micros:num_batch_threads, "
        "comma-separated (default: the current settings)",
    )
    p.add_argument("--seconds", type=POSITIVE, default=10.0, help="per point")
    p.add_argument("--warmup-seconds", type=NON_NEGATIVE, default=3.0, help="per server")
    p.add_argument("--limit-seconds", type=POSITIVE, default=3.0, help="per limit measurement")
    p.add_argument(
        "--url",
        default=None,
        help="drive this running gateway instead (with the key of CNNSERVE_API_KEYS or "
        "CNNSERVE_API_KEYS_FILE, as the gateways bench starts itself read it)",
    )
    add_ca_cert(p, "an https:// --url (wrk itself does not check certificates)")
    p.add_argument("--server-pid", type=int, default=None, help="its pid, for CPU and RSS")
    p.add_argument(
        "--reference",
        type=Path,
        default=Path("loadtests/reference_server.py"),
        help="tutorial-style server to compare with",
    )
    p.add_argument(
        "--batching-reference",
        type=Path,
        default=Path("loadtests/batching_reference_server.py"),
        help="batching TensorFlow server to compare with",
    )
    p.add_argument(
        "--reference-workers",
        type=int,
        default=None,
        help="for both reference servers; default: the most swept workers",
    )
    p.add_argument("--no-batching-reference", action="store_true")
    p.add_argument("--no-reference", action="store_true", help="neither reference server")
    p.add_argument("--slo-p99-ms", type=POSITIVE, default=100.0, help="for the batching advisor")
    p.add_argument(
        "--runtime-table", action="store_true", help="also time each runtime (batch sizes below)"
    )
    p.add_argument(
        "--batch-sizes", type=positive_ints, default="1,8,32", help="for --runtime-table"
    )
    p.add_argument(
        "--overload",
        type=positive_ints,
        default=None,
        metavar="LEVELS",
        help="instead of the sweep, check the overload targets (docs/failure-modes.md): "
        "wrk alone at the first level (capacity), then at each further level with a polite "
        "probe, a client retrying at once, readiness polls and the server's memory beside "
        "it, e.g. 32,128,512 (writes --output, default reports/overload.json, or "
        "overload-grpc.json with --protocol grpc; the photo "
        "mix; --workers, --seconds, --warmup-seconds, --url, --server-pid and --version "
        "apply, the sweep's other options do not)",
    )
    p.add_argument(
        "--open-loop",
        type=multiples,
        default=[],
        metavar="MULTIPLES",
        help="for --overload: after its levels, an open loop at each of these multiples of "
        "the capacity measured, e.g. 4 (requests sent at that rate whatever the answers "
        "take, as k6's arrival-rate executors and vegeta send, from a Python generator: "
        "the report says whether it kept the rate; --overload may then be the capacity "
        "level alone; REST only)",
    )
    p.add_argument(
        "--probe-url",
        default=None,
        metavar="URL",
        help="for --overload with --url: where readiness is polled, as a kubelet probes it "
        "(the gateway's CNNSERVE_PROBE_PORT, e.g. http://127.0.0.1:8002; the REST port is "
        "polled beside it); default --url. A gateway bench starts has a probe port",
    )
    p.add_argument(
        "--protocol",
        choices=("rest", "grpc"),
        default="rest",
        help="for --overload: grpc sends ImageClassifier Classify calls, a level being "
        "that many calls in flight, 16 a connection at most over 8 at least (readiness is "
        "polled over REST)",
    )
    p.add_argument(
        "--grpc-target",
        default=None,
        metavar="HOST:PORT",
        help="the --url gateway's gRPC port, for --overload --protocol grpc (plaintext)",
    )
    p.add_argument(
        "--output", type=Path, default=None, help="default reports/bench.json; PNG beside"
    )
    p.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    from service.bench.process import ServerDidNotStart
    from service.bench.wrk import KeyRefused

    problem = _setup_problem(args, settings)
    if problem:
        print(f"cnnserve bench: {problem}", file=sys.stderr)
        return 2
    try:
        return _bench_models(args, settings)
    except ServerDidNotStart as exc:  # its own reason is in the log's tail, printed
        print(f"cnnserve bench: a server did not start: {exc}", file=sys.stderr)
        return 1
    except KeyRefused as exc:
        print(f"cnnserve bench: {exc}", file=sys.stderr)
        return 1


def _setup_problem(args: argparse.Namespace, settings: Settings) -> str:
    """Why bench cannot run, told before any measurement (they take minutes): an --output
    it cannot write, a key it cannot read, a --url gateway that does not answer it or
    refuses its key; "" when there is none."""
    if args.protocol == "grpc" and not args.overload:
        return "--protocol grpc is for --overload (the sweep drives REST with wrk)"
    if args.probe_url and not (args.overload and args.url):
        return "--probe-url is for --overload with --url (a gateway bench starts has one)"
    if args.open_loop and not args.overload:
        return "--open-loop is for --overload, whose first level measures the capacity"
    if args.open_loop and args.protocol == "grpc":
        return "--open-loop sends REST requests; measure gRPC with --overload's levels"
    if args.protocol == "grpc" and args.url and not args.grpc_target:
        return "--overload --protocol grpc with --url needs --grpc-target HOST:PORT, its gRPC port"
    if args.grpc_target and (args.protocol != "grpc" or not args.url):
        return "--grpc-target is the --url gateway's gRPC port, for --overload --protocol grpc"
    if args.protocol == "grpc" and args.url and args.url.startswith("https://"):
        return (
            "--protocol grpc drives plaintext gRPC, and a gateway serving https:// speaks "
            "TLS on its gRPC port too; measure its REST side, or one without TLS"
        )
    output = _output(args)
    if output.is_dir():
        return f"--output {output} is a folder; give the report's file name"
    if unwritable := unwritable_folder(output.parent):
        return unwritable
    try:
        headers = api_key_headers(settings)  # the key wrk sends (bench.wrk.key_headers)
    except ValueError as exc:
        return str(exc)
    if args.ca_cert is not None and not (args.url or "").startswith("https://"):
        return f"--ca-cert is for an https:// --url (got --url {args.url})"
    if not args.url:
        return ""
    import httpx

    url = args.url.rstrip("/")
    try:
        with _gateway_client(args, headers) as client:
            health = client.get(f"{url}/healthz").status_code
            # A route that needs the key: a wrong one shows now, not as 401s in the report.
            keyed = client.get(f"{url}/v1/models/{args.model}").status_code
    except httpx.InvalidURL as exc:  # not an HTTPError
        return f"--url {args.url!r} is not a URL: {exc}"
    except httpx.HTTPError as exc:
        health, keyed = 0, 0
        if (told := untrusted(url, exc, args.ca_cert)) is not None:
            return told
    if health != 200:
        return (
            f"no gateway answers at {url} (GET /healthz); start one with `cnnserve serve`, "
            "or leave --url out and bench starts its own"
        )
    if keyed in (401, 403):
        sent = "the key of" if headers else "no key: there is none in"
        return (
            f"{url} answered {keyed} to {sent} this command's CNNSERVE_API_KEYS or "
            "CNNSERVE_API_KEYS_FILE; give bench the gateway's key there"
        )
    return _probe_url_problem(args)


def _probe_url_problem(args: argparse.Namespace) -> str:
    """Why --probe-url is no gateway's /healthz (its readiness would read as not kept
    all through the report), or ""."""
    import httpx

    if not args.probe_url:
        return ""
    url = args.probe_url.rstrip("/")
    try:
        with _gateway_client(args, {}) as client:
            health = client.get(f"{url}/healthz").status_code
    except httpx.InvalidURL as exc:
        return f"--probe-url {args.probe_url!r} is not a URL: {exc}"
    except httpx.HTTPError:
        health = 0
    if health != 200:
        return (
            f"nothing answers GET /healthz at --probe-url {url}: give the gateway's probe "
            "port (CNNSERVE_PROBE_PORT), or leave --probe-url out to poll --url"
        )
    return ""


def _gateway_client(args: argparse.Namespace, headers: dict[str, str]) -> httpx.Client:
    """A client for bench's checks of the --url gateway (its key, its certificate)."""
    import httpx

    return httpx.Client(timeout=5, headers=headers, verify=https_verify(args.ca_cert))


def _unserved(args: argparse.Namespace, settings: Settings, model: str, version: int) -> str:
    """Why the --url gateway cannot be measured as serving ``version`` (what the report
    names and takes its limits from; wrk asks for it by number), or ""."""
    import httpx

    url = args.url.rstrip("/")
    with _gateway_client(args, api_key_headers(settings)) as client:
        try:
            answer = client.get(f"{url}/v1/models/{model}")
        except httpx.HTTPError:
            return ""  # reachable a moment ago (_setup_problem): the measurement will say
    if answer.status_code != 200:
        return f"{url} does not serve model {model!r} ({answer.status_code}); give --model"
    served = sorted(
        int(v["version"])
        for v in answer.json().get("model_version_status", [])
        if v.get("state") == "AVAILABLE"
    )
    if version in served:
        return ""
    return (
        f"{url} does not serve version {version} of {model} (it serves {served}); give "
        "--version one of those (by default bench takes the newest in --model-repository)"
    )


def _not_configured(repository: Path, model: str, version: int, on_disk: Iterable[int]) -> str:
    """Why a gateway bench starts on ``repository`` would not serve ``version`` of the
    versions ``on_disk``, or ""."""
    from service.repository import read_repository

    config = next((c for c in read_repository(repository) if c.name == model), None)
    if config is None:
        return f"{repository}/models.config does not configure model {model!r}; give --model"
    served = sorted(config.wanted_versions(on_disk))
    if version in served:
        return ""
    return (
        f"{repository}/models.config serves versions {served} of {model} ({config.policy}), "
        f"not {version}: give --version one of those"
    )


def _output(args: argparse.Namespace) -> Path:
    """Where the report goes (its PNG beside it)."""
    if args.overload:
        default = (
            "reports/overload-grpc.json" if args.protocol == "grpc" else "reports/overload.json"
        )
    else:
        default = "reports/bench.json"
    return args.output or Path(default)


def _bench_models(args: argparse.Namespace, settings: Settings) -> int:
    if args.model_kind == "repository":
        return _bench_on(args, settings, args.model_repository, args.model)
    if args.url:
        print("cnnserve bench: --model-kind builds a model; it cannot drive --url", file=sys.stderr)
        return 2
    from service.bench import mobilenet
    from service.bench.runtime_table import machine

    with tempfile.TemporaryDirectory(prefix="cnnserve-bench-model-") as tmp:
        print(f"building {mobilenet.MODEL_NAME} on {machine()}", file=sys.stderr)
        version_dir = mobilenet.build_repository(Path(tmp))
        return _bench_on(args, settings, version_dir.parents[1], mobilenet.MODEL_NAME)


def _nothing_succeeded(runs: list[dict[str, Any]]) -> bool:
    """Whether no request of these wrk runs succeeded, said in one line: a report of
    refusals alone would pose as the gateway's numbers."""
    if any(run["ok"] for run in runs):
        return False
    statuses = {status for run in runs for status in run["statuses"]}
    print(
        "cnnserve bench: no request to the gateway succeeded (statuses: "
        f"{', '.join(sorted(statuses)) or 'none, no answer'}); nothing written",
        file=sys.stderr,
    )
    return True


def _bench_on(args: argparse.Namespace, settings: Settings, repository: Path, model: str) -> int:
    from service.bench import advisor, sweep, tables, write_json
    from service.bench.plot import plot
    from service.bench.runtime_table import bench_runtimes, machine
    from service.repository import version_dirs

    versions = version_dirs(repository / model)
    if not versions:
        raise DatasetError(f"no published version of {model} in {repository}")
    version = max(versions) if args.version is None else args.version
    if version not in versions:
        raise DatasetError(f"no version {version} of {model} in {repository}")
    if args.overload:
        return _overload(args, settings, repository, model)
    batchings = args.batching or [sweep.Batching.of(settings)]
    workers: list[int] = args.workers
    if args.url and len(workers) * len(batchings) > 1:
        print(
            "cnnserve bench: with --url the server's settings are fixed; give one --workers "
            "and at most one --batching (they only label the run)",
            file=sys.stderr,
        )
        return 2
    unserved = (
        _unserved(args, settings, model, version)
        if args.url
        else _not_configured(repository, model, version, versions)
    )
    if unserved:
        print(f"cnnserve bench: {unserved}", file=sys.stderr)
        return 2
    peers = []
    for key, label, script, off in (
        ("reference", "reference (tutorial-style, TF per request)", args.reference, False),
        (
            "batching_reference",
            "batching reference (TF, batch 32)",
            args.batching_reference,
            args.no_batching_reference,
        ),
    ):
        if args.no_reference or off:
            continue
        if not script.exists():
            print(f"cnnserve bench: no reference server at {script}; skipped", file=sys.stderr)
            continue
        peers.append(sweep.Peer(key, label, script, args.reference_workers or max(workers)))
    plan = sweep.Plan(
        repository=repository,
        version_dir=versions[version],
        concurrency=args.concurrency,
        configs=[sweep.ServerConfig(w, b) for w in workers for b in batchings],
        seconds=args.seconds,
        warmup_seconds=args.warmup_seconds,
        limit_seconds=args.limit_seconds,
        peers=peers,
        url=args.url,
        server_pid=args.server_pid,
        payload=sweep.make_payload(args.payload, settings.fashion_mnist_dir),
        check_answers=8 if args.model_kind != "repository" else 0,
    )
    print(f"bench {model}/{version} on {machine()}", file=sys.stderr)
    data = {
        "machine": machine(),
        "model": f"{model}/{version}",
        "model_kind": args.model_kind,
        "command": "cnnserve " + shlex.join(args.argv),
        **sweep.run(plan, settings),
    }
    if _nothing_succeeded([point for run in data["runs"] for point in run["points"]]):
        return 1
    if args.runtime_table:
        data["runtimes"] = [
            row
            for threads in sorted({1, os.cpu_count() or 1})
            for row in bench_runtimes(
                versions[version],
                cache_dir=settings.cache_dir,
                batch_sizes=args.batch_sizes,
                seconds=args.limit_seconds,
                threads=threads,
            )
        ]
    data["advice"] = advisor.recommend(data["runs"], args.slo_p99_ms)
    output = _output(args)
    write_json(output, data)
    png = output.with_suffix(".png")
    plot(data, png)
    print(tables.sweep_table(data))
    print()
    print(tables.limits_table(data))
    print()
    if side := tables.side_by_side_table(data):
        print(side)
        print()
    print(advisor.describe(data["advice"]))
    print(f"written to {output} and {png}", file=sys.stderr)
    return 0


def _overload(args: argparse.Namespace, settings: Settings, repository: Path, model: str) -> int:
    from service.bench import overload, write_json
    from service.bench.photos import photo_mix
    from service.bench.plot import plot_overload
    from service.bench.runtime_table import machine
    from service.bench.tables import overload_table

    capacity, *overloads = args.overload
    if (not overloads and not args.open_loop) or min(overloads, default=capacity + 1) <= capacity:
        print(
            "cnnserve bench: --overload needs the capacity level first and at least one "
            f"higher one, e.g. 32,128, or --open-loop (got {','.join(map(str, args.overload))})",
            file=sys.stderr,
        )
        return 2
    if args.server_pid is not None and not Path(f"/proc/{args.server_pid}").exists():
        print(f"cnnserve bench: no process {args.server_pid} (--server-pid)", file=sys.stderr)
        return 2
    if len(args.workers) > 1 or args.batching:
        print(
            "cnnserve bench: --overload checks one server: one --workers, no --batching",
            file=sys.stderr,
        )
        return 2
    mix = photo_mix()
    plan = overload.Plan(
        repository=repository,
        model=model,
        levels=args.overload,
        images=mix.images,
        image_description=mix.describe(),
        workers=args.workers[0],
        seconds=args.seconds,
        warmup_seconds=args.warmup_seconds,
        url=args.url,
        server_pid=args.server_pid,
        version=args.version,
        protocol=args.protocol,
        grpc_target=args.grpc_target,
        open_loop=args.open_loop,
        probe_url=args.probe_url,
    )
    print(f"bench --overload {model} ({args.protocol}) on {machine()}", file=sys.stderr)
    data = {
        "machine": machine(),
        "model": model,
        "command": "cnnserve " + shlex.join(args.argv),
        **overload.run(plan, settings, lambda line: print(line, file=sys.stderr, flush=True)),
    }
    if _nothing_succeeded([data["capacity"], *(level["wrk"] for level in data["levels"])]):
        return 1
    output = _output(args)
    write_json(output, data)
    png = output.with_suffix(".png")
    plot_overload(data, png)
    print(overload_table(data))
    met = [t["met"] for t in data["targets"]]
    print(
        f"\ntargets met: {met.count(True)} of {len(met)}"
        + (f" ({met.count(None)} not measured)" if None in met else "")
    )
    print(f"written to {output} and {png}", file=sys.stderr)
    return 0
