"""The ASGI application: wiring of settings, registry, data plane and routers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any, NoReturn

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service import __version__, metrics
from service.api import demo, rest, tfserving_rest
from service.api.auth import ApiKeys, KeyFileWatch
from service.api.direct_classify import DirectClassify
from service.api.fastpath import ClassifyFastPath
from service.api.grpc_server import start_grpc, stop_grpc
from service.api.header_room import HeaderRoomCheck
from service.api.http import Admission, EarlyRefusal, RequestGuard, install_error_handlers
from service.api.http_protocol import (
    ACCEPT_WAIT_STATE,
    BODY_BUDGET_STATE,
    BODY_TIMEOUT_STATE,
    DIRECT_CLASSIFY_STATE,
    EARLY_REFUSAL_STATE,
    HEADER_LIMIT_STATE,
    HEADER_TIMEOUT_STATE,
    PROBE_PORT_STATE,
    SEND_TIMEOUT_STATE,
)
from service.api.json_turns import JSON_TURNS_STATE, JsonTurns
from service.api.redoc import add_redoc
from service.api.schemas import error_responses, openapi_without_validation_errors
from service.api.tls import CertificateWatch
from service.concurrency import worker_limit
from service.config import Settings
from service.cpus import usable_cpus
from service.dataplane import DataPlane
from service.logs import setup_logging
from service.memory import trim_memory
from service.readiness import WorkerReadiness
from service.registry import Registry
from service.repository import load_models_config
from service.requestlog import configure_access_log

log = logging.getLogger(__name__)

READINESS_PERIOD_SECONDS = 0.25
SignalHandler = Callable[[int, FrameType | None], None]
# How long a thread may hold the GIL while another waits (CPython's default: 5 ms). The
# event loop, the batch thread and the decode threads take turns many times per
# request; with the default, a batch thread whose inference returned (LiteRT releases
# the GIL while it computes) could wait up to 5 ms behind a busy event loop to deliver
# its results. Measured under overload (2 workers, photo mix, wrk retrying every 503 at
# once, 3 rounds): admitted p99 at 128 connections 120 -> 91 ms, goodput at 512
# connections 844 -> 1,016 req/s; unchanged at 32 connections.
GIL_SWITCH_INTERVAL_SECONDS = 0.0005
DOCS_URL = "/docs"  # Swagger UI; FastAPIOffline serves it itself (app.docs_url stays None)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; with no argument, settings come from CNNSERVE_* (worker processes)."""
    if settings is None:  # a worker process started by uvicorn: a fresh interpreter
        setup_logging()
        settings = Settings()
    # One limit per worker, shared by REST and gRPC (service.concurrency).
    concurrency = worker_limit(settings)
    keys, key_file = _api_keys(settings)

    admission = Admission(
        max_body_bytes=settings.max_body_bytes,
        body_read_timeout_seconds=settings.body_read_timeout_seconds,
        concurrency=concurrency,
        keys=keys,
        admit_at_headers=settings.admit_at == "headers",
    )
    routers = [rest.router, tfserving_rest.router, *([demo.router] if settings.demo_page else [])]
    guarded_routes = [route for router in routers for route in router.routes]
    quiet_paths = frozenset({settings.metrics_path})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        readiness = WorkerReadiness.from_environment(settings.workers)
        # A worker that replaces one (respawned, SIGHUP): its siblings serve.
        replacing = readiness.replica_serving()
        # A broken models.config stops start-up here, as it stops TF Serving; not that of
        # a worker respawned after one died: uvicorn stops the whole server when such a
        # worker fails to start. It serves nothing until a poll reads the file (so only
        # with polling on). On SIGHUP a new worker that fails keeps the old one serving.
        respawned = replacing and not readiness.restarting()
        config_may_fail = respawned and settings.poll_seconds > 0
        if not config_may_fail:
            load_models_config(settings.model_repository)
        if key_file is not None:
            # The key file alike: a worker that replaces one that died starts without it
            # and refuses what needs a key (503) until a check reads it; it failed to
            # start, and uvicorn respawned it in a loop, a traceback each time.
            key_file.load(may_fail=respawned and settings.api_keys_poll_seconds > 0)
        else:  # nothing to read, nothing wrong (unset, the gauge read 0: an alert's "failed")
            metrics.observe_api_keys_file(True)
        tls = (
            CertificateWatch(settings.tls_certfile, settings.tls_keyfile)
            if settings.tls_certfile is not None and settings.tls_keyfile is not None
            else None
        )
        if tls is not None:
            tls.start()
        else:
            metrics.observe_tls_files(ok=True)
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)
        stop_access_log = configure_access_log(
            settings.access_log, settings.access_log_refusals_per_second
        )
        metrics.set_concurrency_limit(concurrency.limit)
        registry = Registry(settings, shedding=concurrency.shedding)
        pool = ThreadPoolExecutor(max_workers=max(2, usable_cpus()), thread_name_prefix="decode")
        app.state.registry = registry
        app.state.dataplane = DataPlane(settings, registry, pool, readiness, concurrency)
        setattr(app.state, JSON_TURNS_STATE, JsonTurns())
        # Load in the background so /healthz answers (and /readyz says 503) meanwhile.
        loading = asyncio.create_task(
            registry.start(config_may_fail=config_may_fail), name="registry-start"
        )
        loading.add_done_callback(_after_loading)
        if replacing:
            # A replacement worker (respawned, or SIGHUP): its siblings serve, so it
            # listens (gRPC here, REST once the lifespan has started) only once it can
            # answer; it took connections at once and answered them 503 before.
            log.info("the other workers serve: listening once the models are loaded")
            await asyncio.wait([loading])
            await _until_it_serves(registry, readiness, settings.poll_seconds)
        # None if disabled.
        grpc_servers = await start_grpc(settings, app.state.dataplane, keys, tls)
        stopping_calls: list[asyncio.Task[None]] = []

        def stop_calls() -> None:
            """gRPC stops accepting and drains beside REST, within the same grace."""
            if not stopping_calls:
                concurrency.set_serving(False)  # its listeners close now
                stopping_calls.append(
                    asyncio.create_task(
                        stop_grpc(
                            grpc_servers,
                            settings.shutdown_grace_seconds,
                            app.state.dataplane,
                            settings.grpc_port,
                        )
                    )
                )

        restore = _drain_on_sigterm(readiness, settings.shutdown_delay_seconds, stop_calls)
        publishing = asyncio.create_task(_publish_readiness(registry, readiness, settings))
        watching = asyncio.create_task(concurrency.watch_event_loop(), name="loop-lag")
        trimming = asyncio.create_task(trim_memory(), name="malloc-trim")
        following = (
            asyncio.create_task(key_file.follow(settings.api_keys_poll_seconds), name="keys")
            if key_file is not None and settings.api_keys_poll_seconds > 0
            else None
        )
        renewing = (
            asyncio.create_task(tls.follow(settings.tls_poll_seconds), name="tls")
            if tls is not None and settings.tls_poll_seconds > 0
            else None
        )
        concurrency.set_serving(True)  # REST listens once this startup is over
        try:
            # Lifespan state: uvicorn hands it to every connection's protocol.
            yield {
                HEADER_TIMEOUT_STATE: settings.header_read_timeout_seconds,
                BODY_TIMEOUT_STATE: settings.body_read_timeout_seconds,
                SEND_TIMEOUT_STATE: settings.send_timeout_seconds,
                HEADER_LIMIT_STATE: settings.max_header_bytes,
                BODY_BUDGET_STATE: settings.max_buffered_body_bytes,
                ACCEPT_WAIT_STATE: settings.queue_wait_budget_seconds,
                PROBE_PORT_STATE: settings.probe_port,
                EARLY_REFUSAL_STATE: EarlyRefusal(
                    admission,
                    quiet_paths,
                    guarded_routes,
                    HeaderRoomCheck(admission, app.state.dataplane),
                ),
                **(
                    {DIRECT_CLASSIFY_STATE: DirectClassify(admission, app.state.dataplane)}
                    if settings.direct_classify
                    else {}
                ),
            }
        finally:
            restore()
            publishing.cancel()
            watching.cancel()
            trimming.cancel()
            for task in (following, renewing):
                if task is not None:
                    task.cancel()
            concurrency.leave()
            readiness.publish(False)
            stop_calls()  # begun on SIGTERM, else now
            await stopping_calls[0]
            if not loading.done():
                loading.cancel()
            await registry.stop()
            pool.shutdown(wait=False, cancel_futures=True)
            metrics.TURN.flush()  # refusals counted in the loop's last turn
            metrics.forget_this_process()
            stop_access_log()
            sys.setswitchinterval(switch_interval)

    # /docs and /redoc from assets the gateway serves itself (no CDN: air-gapped hosts).
    app = FastAPIOffline(
        docs_url=DOCS_URL,
        redoc_url=None,  # service.api.redoc's, without the CDN logo
        title="cnnserve",
        version=__version__,
        description="Image classification over REST, with TF Serving-compatible endpoints.",
        lifespan=lifespan,
        responses=error_responses(),
        # FastAPI's own OpenTelemetry hooks: off. They asked per request whether a
        # tracer or meter provider is set (~4 µs each time); the gateway's telemetry is
        # its Prometheus metrics and access log.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # A trailing slash gets the JSON 404, not Starlette's 307 to a Location built
        # from the Host header (with an empty body): behind a cache that is a redirect
        # any client could plant; TF Serving does not redirect either.
        redirect_slashes=False,
    )
    app.openapi = functools.partial(openapi_without_validation_errors, app, keys.is_open)  # type: ignore[method-assign]
    add_redoc(app)
    app.state.docs_url = DOCS_URL
    install_error_handlers(app, guarded_routes)
    for router in routers:
        app.include_router(router)
    if settings.metrics_path:
        app.add_api_route(
            settings.metrics_path, rest.prometheus_metrics, methods=["GET"], tags=["health"]
        )
    # Added first, so it runs inside RequestGuard (the last added is the outermost).
    app.add_middleware(ClassifyFastPath)
    app.add_middleware(
        RequestGuard,
        admission=admission,
        quiet_paths=quiet_paths,
        routes=guarded_routes,
        probe_port=settings.probe_port,
    )
    return app


def _api_keys(settings: Settings) -> tuple[ApiKeys, KeyFileWatch | None]:
    """The worker's keys, and what follows the key file when there is one (read as the
    lifespan starts). The CLI checked both sources before any worker started."""
    env_keys = settings.env_keys()
    keys = ApiKeys(
        env_keys, metrics_path=settings.metrics_path, protect_metrics=settings.metrics_require_key
    )
    if settings.api_keys_file is None:
        return keys, None
    keys.fail_closed(env_keys)  # until the lifespan has read the file
    return keys, KeyFileWatch(settings.api_keys_file, env_keys, keys)


async def _publish_readiness(
    registry: Registry, readiness: WorkerReadiness, settings: Settings
) -> None:
    """Tell sibling workers whether this one is ready; cheap (a file touch), and frequent
    enough that /readyz lags a worker's own readiness by at most a period. Says once, in
    the log, when this worker became ready and what it serves where."""
    announced = False
    while True:
        ready = registry.is_ready()
        readiness.publish(ready, registry.served_versions())
        if ready and not announced:
            log.info("%s", ready_line(registry, settings))
            announced = True
        await asyncio.sleep(READINESS_PERIOD_SECONDS)


def ready_line(registry: Registry, settings: Settings) -> str:
    """One line for a person: what is served (model, version, runtime) and where."""
    served = []
    for name in registry.model_names():
        version = registry.resolve(name, None, None)
        served.append(f"{name} version {version.version} ({version.runtime.name})")
    grpc = f"gRPC {settings.host}:{settings.grpc_port}" if settings.grpc_port else "gRPC off"
    scheme = "https" if settings.tls_certfile else "http"
    if settings.tls_certfile and settings.grpc_port:
        grpc += " (TLS)"
    metrics = " and metrics" if settings.metrics_path else ""
    probes = f", probes{metrics} on :{settings.probe_port}" if settings.probe_port else ""
    return (
        f"ready: serving {', '.join(served)}; REST {scheme}://{settings.host}:{settings.port} "
        f"(API docs at /docs), {grpc}{probes}"
    )


async def _until_it_serves(registry: Registry, readiness: WorkerReadiness, poll: float) -> None:
    """A replacement worker that loaded fewer versions than its siblings serve (the
    serving version's folder deleted since they loaded it, a broken publish with nothing
    older to fall back to) waits, not listening, until its polls load them or no
    sibling serves them any more: it listened, answered its share of their requests
    404, and flapped the replica's /readyz. Versions, not only models: a version a
    label names, kept in memory after its folder went, answered the label 404 from
    every new worker after a SIGHUP (the rolling restart went through, since each new
    worker served the model). A SIGTERM (the server stops) ends the wait; uvicorn then
    shuts down as soon as start-up returns."""

    def missing() -> set[str]:
        return readiness.served_by_others() - registry.served_versions()

    if poll <= 0 or not missing():
        return
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()

    def ending_the_wait(previous: Any) -> SignalHandler:
        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            loop.call_soon_threadsafe(stopped.set)
            if callable(previous):
                previous(signum, frame)

        return on_sigterm

    restore = _before_signal(signal.SIGTERM, ending_the_wait)
    if restore is None:  # the in-process app of tests: no wait it could not end
        return
    log.warning(
        "this worker cannot serve %s, which its siblings serve (see the load errors "
        "above): not listening until a poll loads it",
        ", ".join(" version ".join(key.rsplit("/", 1)) for key in sorted(missing())),
    )
    try:
        while not stopped.is_set() and missing():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), poll)
    finally:
        restore()
    if not stopped.is_set():
        log.info("this worker serves what its siblings serve: listening")


def _drain_on_sigterm(
    readiness: WorkerReadiness, delay: float, stop_calls: Callable[[], None]
) -> Callable[[], None]:
    """Chain a SIGTERM handler in front of uvicorn's: readiness (REST and gRPC health)
    turns 503 at once, and ``delay`` seconds later uvicorn's graceful shutdown starts
    (stop accepting, finish in-flight work within the grace period, exit) and, beside
    it, ``stop_calls`` (gRPC's: it waited for REST's drain before, and took new calls
    meanwhile, so a shutdown took two grace periods). SIGINT (Ctrl-C) stops the same
    way without the delay: REST closed at once while gRPC took new calls for ~2.6 s
    and its health Watches ended without NOT_SERVING. Returns the function that puts
    the previous handlers back. A no-op off the main thread (the in-process app of
    tests), where signal handlers cannot be set."""
    loop = asyncio.get_running_loop()

    def draining(previous: Any) -> SignalHandler:
        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            if readiness.draining:  # a second SIGTERM: the shutdown under way goes on
                log.info("SIGTERM again: already shutting down")
                return
            readiness.drain()
            log.info("SIGTERM: readiness is 503 now; shutting down in %g s", delay)
            loop.call_soon_threadsafe(loop.call_later, delay, stop_calls)
            if callable(previous):
                if delay:
                    loop.call_soon_threadsafe(loop.call_later, delay, previous, signum, frame)
                else:
                    previous(signum, frame)

        return on_sigterm

    def interrupted(previous: Any) -> SignalHandler:
        def on_sigint(signum: int, frame: FrameType | None) -> None:
            if readiness.draining:
                stop_at_once()
            readiness.drain()
            log.info("SIGINT: readiness is 503 now; shutting down (SIGINT again: at once)")
            loop.call_soon_threadsafe(stop_calls)
            if callable(previous):
                previous(signum, frame)

        return on_sigint

    restores = [
        _before_signal(signal.SIGTERM, draining),
        _before_signal(signal.SIGINT, interrupted),
    ]

    def restore() -> None:
        for each in restores:
            if each is not None:
                each()

    return restore


def stop_at_once() -> NoReturn:
    """A second SIGINT (Ctrl-C again): the process ends now, saying so in its log and
    its exit status. Passed on to uvicorn, its forced quit exited 0 as after a clean
    drain, logged the traceback of the application's cancelled lifespan, and the
    teardown of what the drain would have stopped (gRPC's server, the models) crashed
    the interpreter now and then (SIGSEGV): nothing is left that the kernel does not
    clean up (a server's metrics folder is swept at the next start)."""
    log.warning("stopped at once (SIGINT twice): requests in flight were not answered")
    logging.shutdown()
    os._exit(128 + signal.SIGINT)


def _before_signal(
    signum: signal.Signals, chained: Callable[[Any], SignalHandler]
) -> Callable[[], None] | None:
    """Set ``chained(previous)`` as the handler of ``signum``, in front of the one in
    place (uvicorn's), which it calls in its turn. Returns the function that puts the
    previous one back (unless another was set since), or None off the main thread, where
    signal handlers cannot be set."""
    previous = signal.getsignal(signum)
    handler = chained(previous)
    try:
        signal.signal(signum, handler)
    except ValueError:  # not the main thread
        return None

    def restore() -> None:
        with contextlib.suppress(ValueError):
            if signal.getsignal(signum) is handler:
                signal.signal(signum, previous)

    return restore


def _after_loading(task: asyncio.Task[None]) -> None:
    """Report a failed start; after a good one, freeze the heap: move everything alive
    (TensorFlow's modules, the loaded models: millions of objects) out of the garbage
    collector's reach. Otherwise each full collection walks them all, a pause of ~100 ms
    that shows up as the p99 of every request in flight. Not after a failure: what is
    left then is garbage to collect, not a working set to keep."""
    if task.cancelled():
        return
    if task.exception() is not None:
        log.error("loading the model repository failed: %s", task.exception())
        return
    gc.collect()
    gc.freeze()
