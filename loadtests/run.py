"""`make loadtest`: run the locustfile headless, starting a local server when no HOST.

Every option falls back to the variable `make loadtest` documents (HOST, GRPC_HOST,
PROTOCOL, USERS, SPAWN_RATE, DURATION, TARGET_RPS, MAX_P99_MS, MAX_FAIL_RATIO,
PROCESSES, MODEL, MODEL_REPOSITORY, API_KEY, GRPC_TLS, GRPC_CA, REQUEST_TIMEOUT). The exit
status is locust's: 0 when every threshold held, 1 with a one-line reason when one did
not; 2 for options it cannot use. CSV and HTML reports and the verdict
(locust-<protocol>_verdict.json) go to loadtests/reports/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from payloads import ENCODINGS, IMAGE_KINDS, parse_mix
from thresholds import bound, ratio

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
USER_CLASSES = {"rest": ["RestUser"], "grpc": ["GrpcUser"], "mixed": ["RestUser", "GrpcUser"]}


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _flag(name: str) -> bool:
    return _env(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _count(text: str) -> int:
    """A whole number >= 1 (USERS, PROCESSES: argparse's message, not a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 or more")
    return value


def _seconds(text: str) -> float:
    """A request timeout: a finite number of seconds above 0 (0 waited for good)."""
    value = bound(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds above 0")
    return value


def _mix(allowed: tuple[str, ...]) -> Callable[[str], str]:
    def checked(text: str) -> str:
        if text:
            try:
                parse_mix(text, allowed)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return checked


def _url(text: str) -> str:
    """HOST: empty (start a server) or an http(s):// URL with a host."""
    if text and (urlsplit(text).scheme not in ("http", "https") or not urlsplit(text).hostname):
        raise argparse.ArgumentTypeError(f"{text!r}: give http://host:port or https://host:port")
    return text


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--host",
        type=_url,
        default=_env("HOST", ""),
        help="REST base URL (HOST); empty = start a server",
    )
    p.add_argument(
        "--grpc-host", default=_env("GRPC_HOST", ""), help="gRPC host:port (default HOST's, :8500)"
    )
    p.add_argument("--protocol", choices=sorted(USER_CLASSES), default=_env("PROTOCOL", "rest"))
    p.add_argument("--users", type=_count, default=_env("USERS", "32"))
    p.add_argument("--spawn-rate", type=float, default=float(_env("SPAWN_RATE", "8")))
    p.add_argument("--duration", default=_env("DURATION", "30s"))
    p.add_argument(
        "--target-rps",
        type=bound,
        default=_env("TARGET_RPS", "0"),
        help="successful answers per second at least (TARGET_RPS; 0 = off)",
    )
    p.add_argument(
        "--max-p99-ms",
        type=bound,
        default=_env("MAX_P99_MS", "0"),
        help="p99 latency at most, in ms (MAX_P99_MS; 0 = off)",
    )
    p.add_argument(
        "--max-fail-ratio",
        type=ratio,
        default=_env("MAX_FAIL_RATIO", "0.01"),
        help="failed requests at most, 0 to 1 (MAX_FAIL_RATIO)",
    )
    p.add_argument("--api-key", default=_env("API_KEY", ""), help="sent as a Bearer key")
    p.add_argument(
        "--grpc-tls",
        action="store_true",
        default=_flag("GRPC_TLS"),
        help="TLS on the gRPC port (GRPC_TLS; REST follows HOST's https://, its "
        "certificate not checked)",
    )
    p.add_argument(
        "--grpc-ca", default=_env("GRPC_CA", ""), help="CA file for the gRPC port (implies TLS)"
    )
    p.add_argument(
        "--request-timeout",
        type=_seconds,
        default=_env("REQUEST_TIMEOUT", "8"),
        help="seconds a request may take before it counts as failed (REQUEST_TIMEOUT)",
    )
    p.add_argument("--processes", type=_count, default=_env("PROCESSES", "1"))
    p.add_argument(
        "--image-mix", type=_mix(IMAGE_KINDS), default=_env("IMAGE_MIX", ""), help="payloads.py"
    )
    p.add_argument(
        "--encoding-mix", type=_mix(ENCODINGS), default=_env("ENCODING_MIX", ""), help="payloads.py"
    )
    p.add_argument("--model", default=_env("MODEL", "fashion_mnist"))
    p.add_argument("--model-repository", default=_env("MODEL_REPOSITORY", "model_repository"))
    p.add_argument("--reports", type=Path, default=HERE / "reports", help="CSV and HTML here")
    p.add_argument("extra", nargs="*", help="more locust options (after --)")
    args = p.parse_args(argv)
    if args.protocol == "mixed" and args.users < len(USER_CLASSES["mixed"]):
        p.error("--protocol mixed runs two kinds of user: give --users 2 or more")
    args.grpc_tls = args.grpc_tls or bool(args.grpc_ca)
    return args


@contextmanager
def local_server(repository: str) -> Iterator[tuple[str, str]]:
    """`cnnserve serve` on free ports (REST and gRPC) until the block ends."""
    from service.launch import free_port, serve_command, stop, wait_for

    port = free_port()
    grpc_port = next(p for p in iter(free_port, None) if p != port)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = serve_command(Path(repository), port, grpc_port, "--poll-seconds", "0")
    with tempfile.NamedTemporaryFile(prefix="cnnserve-loadtest-", suffix=".log") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            try:
                wait_for(f"http://127.0.0.1:{port}/readyz", process, timeout=180)
            except (RuntimeError, TimeoutError) as exc:
                tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-5:]
                raise ServerFailed(f"the local server did not start ({exc}):", tail) from None
            sys.stderr.write(f"loadtest: started a local server on :{port} (gRPC :{grpc_port})\n")
            yield f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
        finally:
            stop(process)


def default_grpc_host(url: str) -> str:
    """The REST URL's host on TF Serving's gRPC port (an IPv6 address in brackets)."""
    name = urlsplit(url).hostname or "127.0.0.1"
    return f"[{name}]:8500" if ":" in name else f"{name}:8500"


class ServerFailed(Exception):
    """The local server did not become ready; its log's last lines say why."""


def locust_command(args: argparse.Namespace, host: str, grpc_host: str) -> list[str]:
    args.reports.mkdir(parents=True, exist_ok=True)
    prefix = args.reports / f"locust-{args.protocol}"
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(HERE / "locustfile.py"),
        "--headless",
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.duration,
        "--host",
        host,
        "--grpc-host",
        grpc_host,
        "--model",
        args.model,
        "--target-rps",
        str(args.target_rps),
        "--max-p99-ms",
        str(args.max_p99_ms),
        "--max-fail-ratio",
        str(args.max_fail_ratio),
        "--request-timeout",
        str(args.request_timeout),
        "--csv",
        str(prefix),
        "--html",
        f"{prefix}.html",
        "--only-summary",
        "--stop-timeout",
        # Room for the requests in flight at the end to time out, recorded as failures
        # (killed at the stop, a hung server's last requests were never counted).
        f"{max(10.0, args.request_timeout + 2):g}",
    ]
    for option, value in (
        ("--image-mix", args.image_mix),
        ("--encoding-mix", args.encoding_mix),
        ("--api-key", args.api_key),
        ("--grpc-ca", args.grpc_ca),
    ):
        if value:
            cmd += [option, value]
    if args.grpc_tls:
        cmd.append("--grpc-tls")
    if args.processes != 1:
        cmd += ["--processes", str(args.processes)]
    return cmd + args.extra + USER_CLASSES[args.protocol]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # An earlier run's verdict must not stand for this one, which may reach none.
    args.reports.mkdir(parents=True, exist_ok=True)
    verdict = args.reports / f"locust-{args.protocol}_verdict.json"
    verdict.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    if args.host:
        host = args.host.rstrip("/")
        grpc_host = args.grpc_host or default_grpc_host(host)
        return subprocess.call(locust_command(args, host, grpc_host), env=env)
    try:
        with local_server(args.model_repository) as (host, grpc_host):
            return subprocess.call(locust_command(args, host, grpc_host), env=env)
    except ServerFailed as exc:
        message, tail = exc.args
        sys.stderr.write("loadtest FAILED: " + "\n  ".join([message, *tail]) + "\n")
        verdict.write_text(json.dumps({"passed": False, "reason": message}, indent=2))
        return 1


if __name__ == "__main__":
    sys.exit(main())
