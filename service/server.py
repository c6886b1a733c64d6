"""`cnnserve serve`: run the gateway with uvicorn, one model copy per worker process."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import math
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from service.config import Settings
from service.readiness import READINESS_DIR_ENV, RESTARTING, process_alive
from service.siblings import SIBLINGS_DIR_ENV, clear_dead_slots

log = logging.getLogger(__name__)

# Spelled out, not imported from service.metrics: importing prometheus-client before the
# variable is set would pick its in-memory value store.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR_PREFIX = "cnnserve-metrics-"
WORKER_START_SECONDS = 300
# How often the supervisor checks its workers are alive when no signal wakes it (uvicorn's).
SUPERVISOR_TICK_SECONDS = 0.5


def _settings_env(settings: Settings) -> dict[str, str]:
    """Settings as CNNSERVE_* variables, so worker processes rebuild the same object."""
    return {
        f"CNNSERVE_{name.upper()}": str(value)
        for name, value in settings.model_dump().items()
        if value is not None
    }


def startup_problem(settings: Settings) -> str | None:
    """What would stop start-up, found before any worker starts, in one line (each
    worker would otherwise print its own traceback, and with several the supervisor
    exits 0): a repository that is not a folder, an unreadable models.config, a port in
    use, TLS files that cannot be loaded."""
    from service.errors import ConfigError
    from service.repository import read_repository

    where = "(the model repository is --model-repository, CNNSERVE_MODEL_REPOSITORY)"
    if settings.model_repository.exists() and not settings.model_repository.is_dir():
        return f"{settings.model_repository} is a file, not a folder {where}"
    try:
        read_repository(settings.model_repository)
    except ConfigError as exc:
        return f"{exc} {where}"
    # Workers share the gRPC port (SO_REUSEPORT), so a second server's workers would
    # share it too and split the connections between two servers: only a free port will
    # do. uvicorn's own bind of the REST port says neither which port nor what to do.
    for port, what, flags in (
        (settings.port, "REST", "--port, CNNSERVE_PORT"),
        (settings.grpc_port, "gRPC", "--grpc-port, CNNSERVE_GRPC_PORT; 0 turns gRPC off"),
        (settings.probe_port, "the probe port", "--probe-port, CNNSERVE_PROBE_PORT; 0 = none"),
    ):
        failed = _port_problem(settings.host, port) if port else None
        if failed is None:
            continue
        listen = f"{what} cannot listen on {settings.host}:{port} ({failed.strerror or failed})"
        if failed.errno == errno.EADDRINUSE:
            return f"{listen}; another server uses it? ({flags})"
        if failed.errno == errno.EACCES:
            return f"{listen}; ports below 1024 need privileges: use another ({flags})"
        # An address this machine does not have, or a name that does not resolve: the
        # port was not the problem ("another server uses it?" sent people after one).
        return f"{listen}; is it an address of this machine? (--host, CNNSERVE_HOST)"
    return _tls_problem(settings)


def _port_problem(host: str, port: int) -> OSError | None:
    """Why ``port`` cannot be bound on ``host`` now (a plain bind fails while anything
    listens there; TIME_WAIT is fine), or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


def _tls_problem(settings: Settings) -> str | None:
    if not settings.tls_certfile or not settings.tls_keyfile:
        return None
    from service.api.tls_files import load_problem  # not .tls: see its docstring

    return load_problem(settings.tls_certfile, settings.tls_keyfile)


def serve(settings: Settings) -> int:
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": "info",
        "access_log": False,  # the gateway writes its own JSON access log
        "timeout_graceful_shutdown": math.ceil(settings.shutdown_grace_seconds),
        "limit_concurrency": settings.max_connections,
        "http": "service.api.http_protocol:GatewayHttpProtocol",
        "timeout_keep_alive": settings.keep_alive_seconds,
        "ssl_certfile": settings.tls_certfile,
        "ssl_keyfile": settings.tls_keyfile,
        "handshake_timeout": settings.header_read_timeout_seconds,  # GatewayConfig's
    }
    forced = False
    with _metrics_directory():
        if settings.workers == 1:
            from service.api.app import create_app

            forced = _run_one(GatewayConfig(create_app(settings), **common), settings)
        else:
            # Workers vote for readiness in the run's folder (service.readiness).
            votes = Path(os.environ[MULTIPROC_ENV]) / "readiness"  # not *.db: not a metric file
            votes.mkdir()
            # And share their unused places (service.siblings).
            siblings = Path(os.environ[MULTIPROC_ENV]) / "siblings"
            siblings.mkdir()
            worker_env = {
                **_settings_env(settings),
                READINESS_DIR_ENV: str(votes),
                SIBLINGS_DIR_ENV: str(siblings),
                SUPERVISOR_ENV: str(os.getpid()),
            }
            with _environment(worker_env):
                # uvicorn.run(workers=N), with the supervisor below.
                config = GatewayConfig(
                    "service.api.app:create_app",
                    factory=True,
                    workers=settings.workers,
                    **common,
                )
                probes = _probe_sockets(settings)
                _Supervisor(config, sockets=[config.bind_socket(), *probes]).run()
    if forced:  # uvicorn's forced quit: a second SIGINT before the app took SIGINT
        from service.api.app import stop_at_once

        stop_at_once()
    return 0


class GatewayConfig(uvicorn.Config):
    """uvicorn's configuration, except that the event loop it makes bounds a TLS
    handshake by ``handshake_timeout`` (the header read timeout: a request's headers are
    due that long after the connection opens, and on a TLS port the handshake comes
    first). uvicorn passes no handshake timeout to the loop, which then waits 60 s: a
    client that opened connections and sent nothing held each that long, where a
    plaintext one is answered 408 after the header timeout. A worker process gets it
    pickled, the subclass included."""

    def __init__(self, app: Any, *, handshake_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.handshake_timeout = handshake_timeout

    def load(self) -> None:
        """uvicorn's, and the worker's TLS context noted for the certificate's reload
        (service.api.tls). A supervised worker first asks to be stopped with its
        supervisor (:func:`die_with_supervisor`) and ignores SIGHUP sent to it."""
        supervisor = os.environ.get(SUPERVISOR_ENV)
        if supervisor is not None and int(supervisor) != os.getpid():
            signal.signal(signal.SIGHUP, _worker_hangup)
            die_with_supervisor(int(supervisor))
        super().load()
        from service.api.tls import serve_rest_with

        serve_rest_with(self.ssl)

    def get_loop_factory(self) -> Callable[[], Any] | None:
        make_loop = super().get_loop_factory()
        if make_loop is None or self.ssl_certfile is None:
            return make_loop
        seconds = self.handshake_timeout

        def bounded() -> Any:
            return bound_handshakes(make_loop(), seconds)

        return bounded


# The supervisor's pid, in its workers' environment.
SUPERVISOR_ENV = "CNNSERVE_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


def die_with_supervisor(supervisor: int) -> None:
    """In a worker of ``supervisor`` (its pid, ``SUPERVISOR_ENV``): SIGTERM once the
    supervisor is gone (Linux's parent-death signal), so the worker drains and exits. A
    supervisor killed with SIGKILL left its workers serving, orphaned: nothing respawned
    them or could restart them, the next server on the port could not listen, and the
    next `cnnserve serve` removed their metrics folder (their /metrics a 500). Not in the
    supervisor, nor with one worker, whose parent is whatever started the server."""
    name = ctypes.util.find_library("c")
    prctl = getattr(ctypes.CDLL(name), "prctl", None) if name is not None else None
    if prctl is None:
        return  # not Linux: orphans as before
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor:  # gone before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_hangup(signum: int, frame: object) -> None:
    """SIGHUP sent to a worker rather than to the server: said and ignored. Its default
    action ended the worker at once, in-flight requests lost, with no word from it (the
    supervisor then logged only that a child died, and respawned it)."""
    log.warning(
        "SIGHUP to a worker (pid %d): ignored; send it to the server's own process (pid "
        "%s) to restart the workers one at a time",
        os.getpid(),
        os.environ.get(SUPERVISOR_ENV, "?"),
    )


def bound_handshakes(loop: Any, seconds: float) -> Any:
    """``loop``, whose TLS servers give up a handshake after ``seconds`` (uvloop's and
    asyncio's loops take it as ``ssl_handshake_timeout``; uvicorn cannot pass it)."""
    create_server: Callable[..., Awaitable[Any]] = loop.create_server

    async def create_bounded_server(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", seconds)
        return await create_server(*args, **kwargs)

    loop.create_server = create_bounded_server
    return loop


def _probe_sockets(settings: Settings) -> list[socket.socket]:
    """The probe port's listening socket (none without one), served beside the REST
    port's by the same workers (the app answers only the probes and the metrics scrape
    there: service.api.http.RequestGuard). Its own accept queue: under a storm of new
    connections the REST port's held a kubelet's probe for seconds."""
    if not settings.probe_port:
        return []
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.probe_port))
    except OSError as exc:  # taken since startup_problem looked
        sock.close()
        log.error(
            "the probe port cannot listen on %s:%d: %s", settings.host, settings.probe_port, exc
        )
        sys.exit(STARTUP_FAILURE)
    # Not listening yet: each worker's loop listens once its app has started, as it
    # does on the REST port (a probe before that is refused, not queued).
    sock.set_inheritable(True)  # the workers' (uvicorn's bind_socket does the same)
    return [sock]


def _run_one(config: GatewayConfig, settings: Settings) -> bool:
    """uvicorn.run for one worker, with ``config`` as it is (uvicorn.run builds its own).
    SIGHUP, with several workers a rolling restart, has nothing to restart here: it is
    said and ignored (its default action ended the process at once, in-flight requests
    lost, no drain, no log line). Returns whether a second SIGINT cut the drain (the
    app ends the process itself then, service.api.app.stop_at_once, once it started)."""
    config.load_app()
    signal.signal(signal.SIGHUP, _one_worker_hangup)
    server = uvicorn.Server(config)
    probes = _probe_sockets(settings)
    with contextlib.suppress(KeyboardInterrupt):
        # Without a probe port, uvicorn binds as it always did.
        server.run(sockets=[config.bind_socket(), *probes] if probes else None)
    if not server.started:
        sys.exit(STARTUP_FAILURE)
    return bool(server.force_exit)


def _one_worker_hangup(signum: int, frame: object) -> None:
    log.warning(
        "SIGHUP: one worker, nothing to restart (CNNSERVE_WORKERS=2 or more restarts "
        "them one at a time); models.config and the API key file are re-read by polling"
    )


class _Supervisor(Multiprocess):
    """uvicorn's supervisor of worker processes, except that on SIGTERM it closes its
    own copy of the listening socket before it stops the workers. The socket is the
    parent's, shared with the workers; while the parent held it open, the kernel kept
    accepting connections that no worker would take once they had closed theirs, and
    reset them when the parent exited (clients hung for the whole grace period, then
    failed). Now connections are refused as soon as the workers close their listeners,
    as with one worker."""

    def run(self) -> None:
        """uvicorn's loop, except that a signal wakes it at once (Python writes a byte to
        the wakeup socket as it arrives). uvicorn looked at its signals every 0.5 s: a
        SIGTERM to the whole process group (Ctrl-C's SIGINT, systemd's stop, `kill --
        -PGID`) reached the workers first, which closed their listeners while this
        process held its copy of the socket for up to 0.5 s more; connections the kernel
        queued meanwhile were reset when it closed, their requests sent and lost (3 of 3
        keep-alive clients that reconnected after their connection: close). A SIGTERM to
        this process alone turned readiness 503 0.1-0.5 s late."""
        log.info("Started parent process [%d]", os.getpid())
        woken, wake = socket.socketpair()
        woken.setblocking(False)
        wake.setblocking(False)
        previous = signal.set_wakeup_fd(wake.fileno())
        try:
            self.init_processes()
            while not self.should_exit.is_set():
                select.select([woken], [], [], SUPERVISOR_TICK_SECONDS)
                with contextlib.suppress(BlockingIOError):
                    woken.recv(4096)
                self.handle_signals()
                self.keep_subprocess_alive()
        finally:
            signal.set_wakeup_fd(previous)
            woken.close()
            wake.close()
        self.terminate_all()
        self.join_all()
        log.info("Stopping parent process [%d]", os.getpid())

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()

    def keep_subprocess_alive(self) -> None:
        """uvicorn's respawn of a worker that died, which also clears the dead worker's
        slot in the siblings' table (service.siblings.clear_dead_slots)."""
        before = {process.pid for process in self.processes}
        super().keep_subprocess_alive()
        gone = before - {process.pid for process in self.processes}
        folder = os.environ.get(SIBLINGS_DIR_ENV)
        if gone and folder:
            clear_dead_slots(Path(folder), self.config.workers, {p for p in gone if p})

    def restart_all(self) -> None:
        """uvicorn's rolling restart (SIGHUP), with the workers told that a SIGTERM now
        is a replacement's, not the replica's stop (service.readiness.RESTARTING)."""
        marker = Path(os.environ[READINESS_DIR_ENV]) / RESTARTING
        marker.touch()
        # What a new worker has to start (imports, loading the models): it listens once
        # loaded (service.api.app); past this the restart is given up and the old worker
        # kept. Only here: the same setting is how long a worker's ping may take before
        # it is thought hung, which must stay short.
        ping = self.config.timeout_worker_healthcheck
        self.config.timeout_worker_healthcheck = WORKER_START_SECONDS
        try:
            super().restart_all()
        finally:
            self.config.timeout_worker_healthcheck = ping
            marker.unlink(missing_ok=True)


@contextlib.contextmanager
def _environment(updates: dict[str, str]) -> Iterator[None]:
    """Set variables for the worker processes started inside, then restore the caller's."""
    saved = {name: os.environ.get(name) for name in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _metrics_directory() -> Iterator[None]:
    """A fresh PROMETHEUS_MULTIPROC_DIR for this server's processes, removed at exit.

    Set before anything imports prometheus-client (service.metrics), which picks its
    file-backed value store at import; fresh, so no sample of an earlier run is summed.
    Always on, also with one worker, so that path is the one every run exercises. The
    folder's name holds the server's pid, so a later start removes what a ``kill -9``
    left behind.
    """
    _remove_orphans()
    directory = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = directory
    log.info("worker processes write their metrics to %s (removed at exit)", directory)
    # uvicorn re-raises SIGTERM after a graceful shutdown; by default that would end the
    # process before the folder is removed, so it unwinds as SystemExit instead.
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(directory, ignore_errors=True)


def _remove_orphans() -> None:
    """Remove metrics folders of servers that no longer run (killed before cleaning up)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        pid = folder.name.removeprefix(METRICS_DIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            log.info("removing %s, left by a server that was killed", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _exit_on_signal(signum: int, frame: object) -> None:
    # SIGTERM is the orderly stop (after draining): success. Others keep the shell's
    # 128 + signal convention.
    raise SystemExit(0 if signum == signal.SIGTERM else 128 + signum)
