"""Start a real `cnnserve serve` process on free ports and wait until it answers."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.launch import free_port, serve_command, stop, wait_for

ROOT = Path(__file__).resolve().parents[2]
# Where servers write their logs: tests/conftest.py points it into pytest's own temporary
# folder, which pytest prunes (it keeps the last three runs); /tmp collected ~900 logs.
LOG_DIR = Path(tempfile.gettempdir())
# The servers' cache (LiteRT conversions), also pointed there by tests/conftest.py: a
# test run's conversions stayed in the user's ~/.cache/cnnserve (800 of them).
CACHE_DIR: Path | None = None


class Server:
    def __init__(
        self,
        process: subprocess.Popen[bytes],
        port: int,
        log: Path,
        grpc_port: int = 0,
        tls_ca: Path | None = None,
    ) -> None:
        self.process = process
        self.port = port
        self.tls_ca = tls_ca
        self.url = f"{'https' if tls_ca else 'http'}://127.0.0.1:{port}"
        self.log = log
        self.grpc_port = grpc_port
        self.grpc_target = f"127.0.0.1:{grpc_port}"

    def channel(self) -> grpc.Channel:
        """A gRPC channel to the server (close it, or use it in a with block)."""
        assert self.grpc_port, "started without grpc=True"
        return grpc.insecure_channel(self.grpc_target)

    def stop(self) -> None:
        stop(self.process)

    def client(self, **kwargs: object) -> httpx.Client:
        if self.tls_ca is not None:
            kwargs.setdefault("verify", ssl.create_default_context(cafile=str(self.tls_ca)))
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)  # type: ignore[arg-type]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of every sample named ``name`` on /metrics whose labels include
        ``labels`` (over the other labels and the workers)."""
        with self.client() as client:
            body = client.get("/metrics").text
        return sum(
            sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def wait(self, path: str = "/readyz", status: int = 200, timeout: float = 60) -> None:
        """Poll until ``path`` answers ``status`` (readiness, not a fixed sleep)."""
        try:
            context = None
            if self.tls_ca is not None:
                context = ssl.create_default_context(cafile=str(self.tls_ca))
            wait_for(self.url + path, self.process, status, timeout, context)
        except (RuntimeError, TimeoutError) as exc:
            raise type(exc)(f"{exc}:\n{self.log.read_text()}") from None


@contextmanager
def running_server(
    repository: Path,
    *,
    wait_ready: bool = True,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    grpc_port: int | None = None,
    port: int | None = None,
    tls_ca: Path | None = None,
) -> Iterator[Server]:
    """``grpc_port``: None = gRPC off, 0 = a free port, else that port (``port`` alike:
    None or 0 = a free port); a test restarting a server passes the ports it had.
    ``tls_ca``: the server speaks TLS (set CNNSERVE_TLS_* in ``env``); trust this CA."""
    port = port or free_port()
    if grpc_port == 0:
        grpc_port = next(p for p in iter(free_port, None) if p != port)
    log = LOG_DIR / f"cnnserve-server-{port}.log"
    # One worker unless a test asks for more (--workers wins over the variable): the
    # default, one per core, would start a model copy per core for every test server.
    environment = {
        **({"CNNSERVE_CACHE_DIR": str(CACHE_DIR)} if CACHE_DIR is not None else {}),
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "CNNSERVE_WORKERS": "1",
        **(env or {}),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            serve_command(repository, port, grpc_port or 0, *args),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment,
        )
    server = Server(process, port, log, grpc_port or 0, tls_ca)
    try:
        server.wait("/healthz")
        if wait_ready:
            server.wait("/readyz")
        yield server
    finally:
        server.stop()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (openssl), for a server speaking TLS."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def dated_certificate(folder: Path, begins: str, ends: str) -> tuple[Path, Path]:
    """A self-signed certificate valid from ``begins`` to ``ends`` (openssl's
    YYMMDDHHMMSSZ or YYYYMMDDHHMMSSZ) and its key, in ``folder`` (made). `openssl x509`
    cannot set notBefore: `openssl ca` with a throwaway database can."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key, request = folder / "cert.pem", folder / "key.pem", folder / "request.csr"
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(request)],
        check=True, capture_output=True,
    )  # fmt: skip
    (folder / "index.txt").touch()
    (folder / "serial").write_text("01\n")
    (folder / "ca.cnf").write_text(
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\n"
        "serial = serial\ndefault_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n"
    )
    subprocess.run(
        ["openssl", "ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", str(key),
         "-in", str(request), "-out", str(cert), "-startdate", begins, "-enddate", ends],
        check=True, capture_output=True, cwd=folder,
    )  # fmt: skip
    return cert, key


def eventually(predicate: Callable[[], bool], timeout: float = 60) -> None:
    """Poll a condition on a server (its state, not the clock) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition never held")
        time.sleep(0.05)


def read_response(
    sock: socket.socket, buffered: bytes = b"", *, head_request: bool = False
) -> tuple[bytes, bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length from ``sock``: (head, body, the bytes
    read past it). The answer to a HEAD request (``head_request``) has no body."""
    data = buffered
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            raise ConnectionError(f"connection closed mid-response: {data[:200]!r}")
        data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    found = re.search(rb"content-length: (\d+)", head.lower())
    length = 0 if head_request or found is None else int(found.group(1))
    while len(rest) < length:
        part = sock.recv(65536)
        if not part:  # fail, not spin, when the server closes mid-body
            raise ConnectionError(f"connection closed mid-body: {head[:200]!r}")
        rest += part
    return head, rest[:length], rest[length:]


def workers_of(server: Server) -> set[int]:
    """The pids of the server's worker processes (children of the supervisor that
    multiprocessing spawned; not its resource tracker)."""
    children: set[int] = set()
    for task in Path(f"/proc/{server.process.pid}/task").iterdir():
        children |= {int(c) for c in (task / "children").read_text().split()}
    return {c for c in children if b"spawn_main" in _cmdline(c)}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def accepted_by(pids: set[int], client: socket.socket) -> bool:
    """Whether one of ``pids`` holds the server side of ``client``'s connection (the
    kernel's table names the socket; the process's descriptors show who accepted it)."""
    port = client.getsockname()[1]
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port:  # its remote end is our socket
            inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in inodes:
                    return True
    return False
