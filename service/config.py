"""The one Settings object.

Every knob the gateway and the CLI read lives here, with the environment variable
`CNNSERVE_<FIELD>` as its override. Build it once in the entry point and pass it to
what needs it; nothing imports a module-level instance.
"""

from __future__ import annotations

import difflib
import itertools
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.cpus import usable_cpus

MAX_AUTO_WORKERS = 8
# The fewest calls one gRPC connection may have in progress by default: room for the
# health Watch a client may keep on it, with batch size 1 too.
MIN_GRPC_STREAMS = 8
# Where Debian's dataset-fashion-mnist puts the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# gRPC's largest message limit (a C int).
GRPC_MAX_MESSAGE_LIMIT = 2**31 - 1

API_KEYS_VAR = "CNNSERVE_API_KEYS"
API_KEYS_FILE_VAR = "CNNSERVE_API_KEYS_FILE"

# What the server sets for its own workers (service.readiness, service.siblings,
# service.server): CNNSERVE_ variables that are no setting, and no mistake.
INTERNAL_VARIABLES = frozenset(
    {"CNNSERVE_READINESS_DIR", "CNNSERVE_SIBLINGS_DIR", "CNNSERVE_SUPERVISOR_PID"}
)

RuntimeName = Literal["auto", "tensorflow", "litert"]
BackendName = Literal["embedded", "tfserving"]


class Settings(BaseSettings):
    # No setting takes inf or nan: an infinite CNNSERVE_REQUEST_TIMEOUT_SECONDS started a
    # server that answered every request without a deadline 400, the client's fault; an
    # infinite read timeout turned the slow-client protection off.
    model_config = SettingsConfigDict(env_prefix="CNNSERVE_", extra="ignore", allow_inf_nan=False)

    # --- where things are -------------------------------------------------------------
    model_repository: Path = Field(
        Path("model_repository"),
        description="Folder in TF Serving's layout: models.config plus <model>/<version>/.",
    )
    fashion_mnist_dir: Path = Field(
        FASHION_MNIST_DIR,
        description="IDX files of Fashion-MNIST (Debian package dataset-fashion-mnist).",
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "cnnserve",
        description="Converted runtime artifacts for SavedModels that did not come with one.",
    )

    # --- network ----------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the REST and gRPC servers bind.")
    port: int = Field(8000, ge=0, le=65535, description="REST port.")
    grpc_port: int = Field(8500, ge=0, le=65535, description="gRPC port; 0 disables gRPC.")
    probe_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="A port of its own for the probes and the metrics scrape: /healthz, "
        "/readyz and the metrics path, anything else 404 (TLS as on the REST port). A "
        "probe on a new connection to the REST port waits behind every connection queued "
        "there: under an open loop at 4x one worker's capacity, 0.5-4 s, against 2-20 ms "
        "here. 0 = none.",
    )
    workers: int = Field(
        0,
        ge=0,
        le=64,
        description=f"Worker processes, one model copy each; 0 = one per usable core (affinity, "
        f"capped by the cgroup CPU quota), at most "
        f"{MAX_AUTO_WORKERS}.",
    )

    # --- models -----------------------------------------------------------------------
    backend: BackendName = Field("embedded", description="embedded runtime or a TF Serving.")
    tfserving_address: str = Field("127.0.0.1:8500", description="TF Serving gRPC host:port.")
    tfserving_ca_file: Path | None = Field(
        None,
        description="PEM certificates that TF Serving's certificate must chain to: the "
        "gateway then speaks TLS to it (TF Serving's --ssl_config_file). Unset: plaintext.",
    )
    runtime: RuntimeName = Field(
        "auto", description="In-process runtime; auto picks the verified fast artifact."
    )
    poll_seconds: float = Field(
        2.0,
        ge=0,
        description="Repository poll period (TF Serving's file_system_poll_wait_seconds); 0 = off.",
    )
    load_timeout_seconds: float = Field(
        600.0,
        ge=0,
        description="A version not loaded and warmed within this is reported failed, so a "
        "read that hangs (a stuck network file system) stops holding up every later "
        "reload; 0 = wait for ever.",
    )
    intra_op_threads: int = Field(0, ge=0, description="Threads per inference; 0 = cores/workers.")
    canary_percent: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Percent of unlabelled requests sent to the version labelled canary (sticky "
        "per X-Client-Key); the rest go to stable. 0 = off: all go to stable, or without a "
        "stable label to the newest version, as in TF Serving.",
    )
    reload_config_rpc: bool = Field(
        False,
        description="Let gRPC ModelService.HandleReloadConfigRequest rewrite models.config.",
    )

    # --- batching (names and meaning as TF Serving's BatchingParameters) ---------------
    max_batch_size: int = Field(32, ge=1, le=1024)
    batch_timeout_micros: int = Field(1000, ge=0, le=10_000_000)
    max_enqueued_batches: int = Field(
        16, ge=1, description="Hard cap on the queue, in batches (the latency budget sheds first)."
    )
    num_batch_threads: int = Field(1, ge=1, le=64)
    queue_wait_budget_seconds: float = Field(
        0.08,
        gt=0,
        le=60,
        description="Admission: refuse a request (503) at once when the inference queued ahead "
        "of it would take longer than this (seconds of work, from measured per-image time); "
        "the concurrency limit keeps a worker's p99 within 0.6 of it. Sized to a 100 ms p99.",
    )

    inline_inference_max_seconds: float = Field(
        0.02,
        ge=0,
        le=1,
        description="A version's batches run on the event loop rather than a batch thread "
        "when the runtime computes on the calling thread alone (LiteRT with one thread) "
        "and a full batch is estimated (measured seconds per image × max_batch_size) to "
        "take at most this long; 0 = always on the batch threads.",
    )

    direct_classify: bool = Field(
        True,
        description="A raw-body POST /v1/classify that is admitted at once is answered by "
        "the HTTP protocol without the ASGI stack (service.api.direct_classify): the same "
        "answer for less CPU. false = every request through the ASGI app.",
    )

    # --- request limits ----------------------------------------------------------------
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    # Request bodies a worker holds at once, received and not yet answered: past it a
    # request is refused at its headers (503 overloaded, reason "bodies"). Uploads that
    # wait for a concurrency place were held whole before: ~900 concurrent 1.4 MB photos
    # took a worker from 110 MB to 1.2 GB. One body is always taken, whatever its size.
    max_buffered_body_bytes: int = Field(128 * 1024 * 1024, ge=0)
    max_image_pixels: int = Field(40_000_000, ge=1)
    # 150,000 (and a file of at most 64 KiB, service.dataplane.INLINE_DECODE_MAX_BYTES):
    # a 224x224 upload of any usual format, ~1-1.5 ms of the loop at most. At 500,000 (and
    # 256 KiB) a 640x480 PNG (3-5 ms) held the loop for each request, and while it did new
    # requests waited where admission cannot see them (gRPC's core, the sockets): over
    # gRPC, 4x the calls got no refusal (docs/failure-modes.md, "Mid-size images on the
    # event loop").
    inline_decode_max_pixels: int = Field(
        150_000,
        ge=0,
        description="A lone image with at most this many pixels to decode (after JPEG's "
        "reduced-scale decoding) is decoded on the event loop, larger ones and lists on the "
        "decode threads; 0 = always on the decode threads.",
    )
    max_images_per_request: int = Field(64, ge=1)
    max_request_pixels: int = Field(
        100_000_000,
        ge=1,
        description="Pixels all the images of one request may decode to together (from "
        "their headers, after JPEG's reduced-scale decoding; a tiled TIFF's whole tiles, and a "
        "progressive JPEG's scans past ten over its full size); more is 413 image_too_large. "
        "Bounds the CPU one small request can cost.",
    )
    request_timeout_seconds: float = Field(10.0, gt=0, description="Default request deadline.")
    max_request_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="The longest deadline a client may ask for (X-Request-Timeout, a gRPC "
        "deadline); longer ones are cut to it. A request holds what its batch holds "
        "until it gives up: one stuck TF Serving call under a 90 s deadline held a "
        "model's batches for 90 s.",
    )
    max_concurrent_requests: int = Field(
        512,
        ge=1,
        description="Cap on the requests one worker handles at once (REST and gRPC "
        "together); below it the limit adapts to the queue-wait budget; more are refused "
        "(503 / RESOURCE_EXHAUSTED), before their body is read when the worker is full as "
        "their headers come.",
    )
    admit_at: Literal["body", "headers"] = Field(
        "body",
        description="When a REST request with a body takes its place under the concurrency "
        "limit: once its body is in (a client slow to send it holds none: 40 stalled "
        "uploads shut a worker out otherwise), or as its headers are parsed (it then "
        "holds its place while its body comes, as long as the body read timeout).",
    )
    # 500, not 1,000: a refusal costs the worker ~0.2 ms with the kernel's share, and at
    # 1,000 a second per worker goodput at 4x the load was 61-70% of capacity (under the
    # 70% target); at 500, 81-91% (docs/failure-modes.md "The refusal pace").
    max_refusals_per_second: float = Field(
        500.0,
        ge=0,
        description="503s one worker answers per second, about; beyond that the refusals of "
        "clients retrying at once wait their turn, so they cannot take the CPU from admitted "
        "requests (0 = unpaced). A refused request's body, read to be dropped, counts one "
        "503 more per 200 KB that came.",
    )
    retry_at_once_seconds: float = Field(
        0.01,
        gt=0,
        le=1.0,
        description="A client whose next request on a connection comes within this long of "
        "its 503 is retrying at once: only such refusals wait for the pace. Raise it to a "
        "few round trips for clients far away.",
    )
    max_connections: int = Field(
        2048,
        ge=1,
        description="Open HTTP connections per worker: a request on a connection taken on "
        "over it gets 503 and that connection closes; those from before are served on "
        "(probes and the metrics scrape are always answered). gRPC "
        "connections are held to it too: each gRPC listener to twice an even share, its "
        "core closing one past that as it comes.",
    )
    grpc_max_concurrent_streams: int = Field(
        0,
        ge=0,
        le=65_536,
        description="Calls one gRPC connection may have in progress at a worker (HTTP/2 "
        "MAX_CONCURRENT_STREAMS); a client's further calls on it wait in the client, not "
        "in the server's queue ahead of other clients' calls. 0 = what the worker infers "
        "at once (max_batch_size x num_batch_threads), at least 8. A health Watch holds "
        "one while it lasts, so 1 is refused: a client checking health over its "
        "connection could send nothing else.",
    )

    @field_validator("tfserving_address")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        # "http://host:8500", "" and "host" (gRPC then tried port 443) started a gateway
        # that stayed unready for good; "host:99999" connected to another port. gRPC's
        # own name forms (dns:///host:port, unix:/path, ipv4:...) pass as they are.
        if value.startswith(("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:")):
            return value
        host, colon, port = value.rpartition(":")
        if "://" in value or not colon or not host or not port.isdigit():
            raise ValueError(
                f"{value!r} is not host:port (e.g. tfserving:8500, no scheme): TF "
                "Serving's gRPC address"
            )
        if not 1 <= int(port) <= 65_535:
            raise ValueError(f"{value!r}: the port must be 1 to 65535")
        return value

    @field_validator("grpc_max_concurrent_streams")
    @classmethod
    def _room_beside_a_watch(cls, value: int) -> int:
        if value == 1:
            raise ValueError(
                "1 leaves no room beside a health Watch (gRPC clients that check health "
                "keep one open on each connection): use 2 or more, or 0 for the default"
            )
        return value

    grpc_max_connection_age_seconds: float = Field(
        300.0,
        ge=0,
        description="A gRPC connection is asked to close (GOAWAY) after this long, and "
        "closed send_timeout seconds later with what it still holds: clients reconnect, "
        "so replicas added since share the load, and a client that takes none of its "
        "answers (an HTTP/2 window left at 0) holds its calls no longer. 0: never.",
    )
    grpc_listeners: int = Field(
        64,
        ge=1,
        le=64,
        description="gRPC servers per worker on the gRPC port (SO_REUSEPORT), each taking "
        "the calls of the connections the kernel gives it. grpc.aio takes a server's calls "
        "one per turn of the event loop, so with one, calls over many connections waited "
        "in gRPC's core, unseen by admission, behind every other connection's; the kernel "
        "hashes connections onto listeners, so the more there are, the fewer clients "
        "share one (16 left a polite client behind a spinning one's calls in some runs).",
    )
    max_health_watches: int = Field(
        100,
        ge=1,
        description="Open gRPC health Watch streams per worker; more are refused "
        "(RESOURCE_EXHAUSTED). Watch needs no API key, and each stream holds one of gRPC's "
        "places for calls in progress for as long as the client likes.",
    )
    header_read_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="A request's headers must arrive within this of the connection opening "
        "or of the request's first byte (else 408 and the connection is closed); a TLS "
        "handshake (REST and gRPC) and a gRPC connection's HTTP/2 preface too. A gRPC peer "
        "must acknowledge the server's SETTINGS within this, and a gRPC connection silent "
        "this long is pinged.",
    )
    max_header_bytes: int = Field(
        65536,
        ge=1024,
        description="A request's line and headers still unfinished after this many bytes "
        "get a 431 and the connection is closed: what a client can make a worker hold.",
    )
    body_read_timeout_seconds: float = Field(
        30.0, gt=0, description="A request body must arrive within this (else 408)."
    )
    send_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="A client that takes none of an answer's bytes for this long (the "
        "connection's send buffer full all the while) is disconnected, as nginx's "
        "send_timeout.",
    )
    keep_alive_seconds: int = Field(
        5, ge=1, description="Idle keep-alive HTTP connections are closed after this."
    )
    shutdown_grace_seconds: float = Field(
        10.0,
        ge=0,
        description="On SIGTERM: seconds in-flight REST and gRPC requests get to finish.",
    )
    shutdown_delay_seconds: float = Field(
        0.0,
        ge=0,
        le=300,
        description="On SIGTERM: seconds to keep serving with readiness 503 before the "
        "listeners close, so load balancers stop sending first.",
    )

    # --- security -------------------------------------------------------------------------
    api_keys: str = Field(
        "",
        repr=False,
        description="Comma-separated API keys; when any is set, requests need one "
        "(Authorization: Bearer <key> or X-API-Key; gRPC metadata authorization).",
    )
    api_keys_file: Path | None = Field(
        None,
        description="File of API keys (one a line, or comma-separated; lines starting with "
        "# are comments), e.g. a mounted secret; every worker reads it again when it changes.",
    )
    api_keys_poll_seconds: float = Field(
        10.0,
        ge=0,
        description="How often each worker checks api_keys_file for a change (a rotated "
        "secret): all workers use the new keys within this; 0 = read only at start.",
    )
    metrics_require_key: bool = Field(
        False, description="With API keys on, /metrics needs a key too (default: open)."
    )
    tls_certfile: Path | None = Field(
        None, description="PEM certificate chain: REST and gRPC serve TLS (with tls_keyfile)."
    )
    tls_keyfile: Path | None = Field(None, description="PEM private key of tls_certfile.")
    tls_poll_seconds: float = Field(
        10.0,
        ge=0,
        description="How often each worker checks tls_certfile and tls_keyfile for a change "
        "(a renewed certificate): new connections use it within this; 0 = read only at start.",
    )

    # --- observability ------------------------------------------------------------------
    metrics_path: str = Field(
        "/metrics",
        pattern=r"^(/[A-Za-z0-9_./-]*)?$",
        description="Path of the Prometheus metrics on the REST port; empty = no endpoint.",
    )
    access_log: bool = Field(True, description="One JSON line per request on stdout.")
    access_log_refusals_per_second: int = Field(
        100,
        ge=0,
        description="Overload refusals (503) one worker logs a line each for per second; past "
        "that they are counted in one line a second per route (they are all in the metrics). "
        "Under 4x overload a worker refuses thousands a second: a line each was ~10% of a "
        "refusal's CPU and a megabyte a second of log (0 = a line for each).",
    )

    # --- demo page ----------------------------------------------------------------------
    demo_page: bool = Field(
        True,
        description="Serve the browser demo page at / (and its /demo/* data); false = 404.",
    )

    @model_validator(mode="after")
    def _size_workers(self) -> Settings:
        # One process per core: a Python worker saturates about one core on decoding and
        # HTTP. Capped because each worker holds its own copy of TensorFlow and the models.
        if self.workers == 0:
            self.workers = min(usable_cpus(), MAX_AUTO_WORKERS)
        return self

    @model_validator(mode="after")
    def _grpc_message_fits(self) -> Settings:
        # gRPC takes its message limit as a C int: past it, start-up failed with an
        # OverflowError traceback (max_images_per_request of 3,565 or more).
        if self.grpc_max_message_bytes > GRPC_MAX_MESSAGE_LIMIT:
            raise ValueError(
                f"max_images_per_request ({self.max_images_per_request}) and max_body_bytes "
                f"({self.max_body_bytes}) make gRPC messages of "
                f"{self.grpc_max_message_bytes} bytes, past the {GRPC_MAX_MESSAGE_LIMIT} "
                f"gRPC allows; lower them"
            )
        return self

    @property
    def grpc_max_message_bytes(self) -> int:
        """gRPC's message limit: the body limit, or a full request of 224×224 images as
        float32 in typed fields (the largest form a client may legitimately send), plus
        protobuf framing and the other fields."""
        images = self.max_images_per_request * 224 * 224 * 3 * 4
        return max(self.max_body_bytes, images) + 1024 * 1024

    @property
    def grpc_streams_per_connection(self) -> int:
        """``grpc_max_concurrent_streams``, or when unset (0) the images the worker
        infers at once, at least :data:`MIN_GRPC_STREAMS`."""
        inferred = self.max_batch_size * self.num_batch_threads
        return self.grpc_max_concurrent_streams or max(MIN_GRPC_STREAMS, inferred)

    @property
    def inference_threads(self) -> int:
        """Threads per inference: the setting, or the cores shared among the workers."""
        return self.intra_op_threads or max(1, usable_cpus() // self.workers)

    def keys(self) -> frozenset[str]:
        """The API keys in effect (empty: authentication off), from the variable and the
        file; raises ValueError naming the variable at fault (the CLI's check at start)."""
        keys = self.env_keys()
        if self.api_keys_file is not None:
            keys |= read_key_file(self.api_keys_file)
        return keys

    def env_keys(self) -> frozenset[str]:
        """The keys of CNNSERVE_API_KEYS (read once: the environment does not change)."""
        keys = _parse_keys(self.api_keys.replace("\n", ","), API_KEYS_VAR, line=None)
        if not keys and self.api_keys:
            # "," in the variable: serving without keys would open what the operator
            # meant to close.
            raise ValueError(_no_key_message(API_KEYS_VAR))
        return keys

    @field_validator("tfserving_ca_file")
    @classmethod
    def _certificates(cls, value: Path | None) -> Path | None:
        # Read at start-up: a wrong path or a key given for a certificate is one line,
        # not a gateway unready for good behind "cannot be reached".
        if value is not None and (problem := pem_certificates_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @field_validator(
        "api_keys_file", "tls_certfile", "tls_keyfile", "tfserving_ca_file", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Helm templates write `CNNSERVE_API_KEYS_FILE=`: no file, not the path "." (it
        # read as "Is a directory"). Not env_ignore_empty for every field: an empty
        # CNNSERVE_METRICS_PATH means "no endpoint", not the default.
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together; set both or neither")
        return self

    @model_validator(mode="after")
    def _ports_distinct(self) -> Settings:
        ports = {"port": self.port, "grpc_port": self.grpc_port, "probe_port": self.probe_port}
        for (one, a), (other, b) in itertools.combinations(ports.items(), 2):
            if a and a == b:
                raise ValueError(f"{one} and {other} are both {a}; pick two ports")
        return self


def pem_certificates_problem(path: Path | str) -> str | None:
    """Why ``path`` is no file of PEM certificates to trust (missing, unreadable, a key
    given for a certificate), or None. Checked where it is named (a setting, a client's
    --ca-cert): one line there, not a TLS error later."""
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except ssl.SSLError:
        return f"{path}: no PEM certificate in it"
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    return None


MAX_KEY_FILE_BYTES = 1024 * 1024


def read_key_file(path: Path) -> frozenset[str]:
    """The keys of an API key file; ValueError naming CNNSERVE_API_KEYS_FILE, the file
    and the line at fault (never a key) when it cannot be read, holds no key or holds
    one no client could send. Read at start (the CLI's check, each worker) and on every
    change (service.api.auth)."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{API_KEYS_FILE_VAR} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:  # /dev/zero, a disk image: not a key file
        raise ValueError(
            f"{API_KEYS_FILE_VAR} {path}: larger than {MAX_KEY_FILE_BYTES // 1024} KiB; "
            "a key file holds API keys, one or a few per line"
        )
    try:  # -sig: an editor's byte-order mark is not part of the first key
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"{API_KEYS_FILE_VAR} {path} line {line}: not UTF-8 text; keys are visible "
            "ASCII characters"
        ) from None
    keys: frozenset[str] = frozenset()
    # Lines end at \n (\r\n's \r is blank around a key): splitlines() also ended them
    # at \v, \f, \x1c-\x1e, \x85 and U+2028/9, and "Secret\vpw" gave two keys, "pw"
    # one, where a key holding them is refused.
    for number, line_text in enumerate(text.split("\n"), 1):
        if not line_text.lstrip().startswith("#"):  # a comment, not keys
            keys |= _parse_keys(line_text, f"{API_KEYS_FILE_VAR} {path}", line=number)
    if not keys:
        # A secret mounted empty (or half written): serving without its keys would
        # open what the operator meant to close.
        raise ValueError(_no_key_message(f"{API_KEYS_FILE_VAR} {path}"))
    return keys


def _parse_keys(text: str, source: str, *, line: int | None) -> frozenset[str]:
    """The comma-separated keys of ``text`` (a line of ``source``'s, or all of it),
    blanks around them dropped. A key is visible ASCII without spaces: what an HTTP
    header and gRPC metadata carry unchanged. A key holding anything else is refused
    by its position, never echoed (a comment line without its #, "clé" that no header
    could present, a pasted key with a tab in it)."""
    keys = []
    for position, item in enumerate(text.split(","), 1):
        key = item.strip(" \t\r\n")  # only these: a key ending in \v is refused, not cut
        if key and not all("!" <= c <= "~" for c in key):
            where = f"line {line}" if line is not None else f"key {position} (comma-separated)"
            raise ValueError(
                f"{source} {where}: a key must be visible ASCII characters without spaces "
                "(comments are lines starting with #); the key is not shown"
            )
        if key:
            keys.append(key)
    return frozenset(keys)


def _no_key_message(source: str) -> str:
    return (
        f"{source} is set but holds no key; authentication would be off. Give at least "
        "one key, or unset it to serve without keys"
    )


# The variables Kubernetes sets in a pod for each Service of its namespace (a Service
# named cnnserve-gateway gives CNNSERVE_GATEWAY_SERVICE_HOST, ..._PORT=tcp://...):
# no settings, and no mistakes (enableServiceLinks, on by default).
_SERVICE_LINK = re.compile(
    r"_SERVICE_(HOST|PORT(_[A-Z0-9_]+)?)$|_PORT_\d+_(TCP|UDP|SCTP)(_(ADDR|PORT|PROTO))?$"
)
_LINK_URL = re.compile(r"(tcp|udp|sctp)://", re.IGNORECASE)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """What is wrong with each CNNSERVE_ variable of ``environ`` that is no setting (any
    case, as the settings read them), with the setting it most likely meant: pydantic
    ignores them, so a misspelt CNNSERVE_API_KEY_FILE served without keys, and
    CNNSERVE_SHUTDOWN_GRACE_SECOND left the grace at 10 s, without a word (an outside
    audit, 12-07)."""
    known = {f"CNNSERVE_{name.upper()}" for name in Settings.model_fields}
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("CNNSERVE_") or upper in known or upper in INTERNAL_VARIABLES:
            continue
        if _SERVICE_LINK.search(upper) or (
            upper.endswith("_PORT") and _LINK_URL.match(environ[name])
        ):
            continue  # Kubernetes' variables for a Service named cnnserve-...
        # Matched without the prefix, which every name shares.
        close = difflib.get_close_matches(
            upper.removeprefix("CNNSERVE_"), sorted(f.upper() for f in Settings.model_fields), n=1
        )
        hint = f" (did you mean CNNSERVE_{close[0]}?)" if close else ""
        problems.append(f"{name} is not a setting{hint}")
    return problems
