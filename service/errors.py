"""Every error a client or operator can see, defined once.

Each class carries a stable machine-readable ``code``, the HTTP status and the gRPC
status it maps to, and whether its message is shown to clients (``expose_message``);
the REST and gRPC adapters translate with :func:`http_status`, :func:`grpc_status` and
:meth:`CnnserveError.public_message` and nothing else. A message says what to do; what
only an operator may see (internal addresses, a backend's own words, tracebacks) goes
in ``detail``, which is logged with the request id and never sent.

    CnnserveError
    ├── InvalidRequest            400  INVALID_ARGUMENT   bad_request
    │   ├── InvalidImage          400  INVALID_ARGUMENT   invalid_image
    │   ├── ImageTooLarge         413  INVALID_ARGUMENT   image_too_large
    │   ├── PayloadTooLarge       413  RESOURCE_EXHAUSTED payload_too_large
    │   ├── HeadersTooLarge       431  RESOURCE_EXHAUSTED headers_too_large
    │   ├── TooManyImages         413  INVALID_ARGUMENT   too_many_images
    │   ├── MethodNotAllowed      405  UNIMPLEMENTED      method_not_allowed
    │   ├── NotImplementedApi     501  UNIMPLEMENTED      not_implemented
    │   ├── RequestTimeout        408  DEADLINE_EXCEEDED  request_timeout
    │   └── UnsupportedMediaType  415  INVALID_ARGUMENT   unsupported_media_type
    ├── Unauthenticated           401  UNAUTHENTICATED    unauthenticated
    │   └── ApiKeysUnavailable    503  UNAVAILABLE        api_keys_unavailable (+ Retry-After)
    ├── NotFound                  404  NOT_FOUND          not_found
    │   ├── ModelNotFound         404  NOT_FOUND          model_not_found
    │   └── VersionNotFound       404  NOT_FOUND          version_not_found
    ├── Overloaded                503  RESOURCE_EXHAUSTED overloaded    (+ Retry-After)
    ├── DeadlineExceeded          504  DEADLINE_EXCEEDED  deadline_exceeded
    ├── ClientClosedRequest       499  CANCELLED          client_closed_request (no one reads it)
    ├── Unavailable               503  UNAVAILABLE        unavailable
    │   ├── ShuttingDown          503  UNAVAILABLE        unavailable   (not a warning)
    │   ├── ModelNotReady         503  UNAVAILABLE        model_not_ready
    │   └── BackendUnavailable    503  UNAVAILABLE        backend_unavailable
    ├── BackendError              502  INTERNAL           backend_error
    └── InternalError             500  INTERNAL           internal       (message hidden)
        ├── ModelLoadError        500  INTERNAL           model_load_failed
        ├── ExportError           500  INTERNAL           export_failed
        └── ConfigError           500  INTERNAL           invalid_config
    DatasetError (CLI only: a dataset that cannot be read; exit status 2)
    PromotionError (CLI only: `cnnserve promote` cannot go on; exit status 1)
    └── NoServer (no server answered the wait for AVAILABLE; exit status 3)
"""

from __future__ import annotations

from typing import ClassVar

import grpc

HIDDEN_MESSAGE = "internal error; the server logged the details"
# Messages echo what the client sent (a model name, a label, a signature). gRPC sends
# the message as the grpc-message trailer, percent-encoded (up to 12 bytes a character),
# and its core refuses metadata over 16 KiB, turning a 17,000-character model name's
# NOT_FOUND into RESOURCE_EXHAUSTED "Stream removed". A bound keeps the status, and any
# client's echo out of the logs' way.
MAX_MESSAGE_CHARS = 1000


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message``, or its start and end around a note of what was left out: the start
    says what is wrong, the end usually what to do (the models there are, …)."""
    if len(message) <= limit:
        return message
    head, tail = limit * 2 // 3, limit // 3
    left_out = len(message) - head - tail
    return f"{message[:head]} … ({left_out} characters left out) … {message[-tail:]}"


class CnnserveError(Exception):
    """Base of every error with a stable code."""

    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    # Seconds a client should wait before retrying, sent as Retry-After when set.
    retry_after: ClassVar[int | None] = None
    # Whether clients see ``message``; when False they get HIDDEN_MESSAGE instead.
    expose_message: ClassVar[bool] = True
    # Whether answering it writes a WARNING: only for the server's own faults. What a
    # client causes (bad input, an API it calls that is not served, its deadline, a
    # shed) is counted in the metrics and the access log: a warning each would let any
    # client flood the log.
    server_fault: ClassVar[bool] = True
    message_limit: ClassVar[int] = MAX_MESSAGE_CHARS

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        message = bounded(message, self.message_limit)
        super().__init__(message)
        self.message = message
        self.detail = detail

    def public_message(self) -> str:
        """What the client sees: the message, unless this class hides it."""
        return self.message if self.expose_message else HIDDEN_MESSAGE

    def log_message(self) -> str:
        """What the operator's log gets: the message and the detail kept from clients."""
        return f"{self.message} ({self.detail})" if self.detail else self.message

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.public_message()}}


class InvalidRequest(CnnserveError):
    code = "bad_request"
    server_fault = False
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidImage(InvalidRequest):
    code = "invalid_image"


class ImageTooLarge(InvalidRequest):
    code = "image_too_large"
    http_status = 413


class PayloadTooLarge(InvalidRequest):
    code = "payload_too_large"
    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class HeadersTooLarge(InvalidRequest):
    """A request's headers (with its request line) over CNNSERVE_MAX_HEADER_BYTES."""

    code = "headers_too_large"
    http_status = 431
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TooManyImages(InvalidRequest):
    code = "too_many_images"
    http_status = 413


class MethodNotAllowed(InvalidRequest):
    code = "method_not_allowed"
    http_status = 405
    grpc_code = grpc.StatusCode.UNIMPLEMENTED

    def __init__(self, message: str, *, allow: str | None = None) -> None:
        super().__init__(message)
        self.allow = allow  # the Allow header of a 405 (RFC 9110), when known here


class NotImplementedApi(InvalidRequest):
    """A TF Serving API cnnserve does not offer: Classify and Regress (tf.Example input)."""

    code = "not_implemented"
    http_status = 501
    grpc_code = grpc.StatusCode.UNIMPLEMENTED


class RequestTimeout(InvalidRequest):
    """The client sent its body too slowly (CNNSERVE_BODY_READ_TIMEOUT_SECONDS)."""

    code = "request_timeout"
    http_status = 408
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnknownVersionLabel(InvalidRequest):
    """A label models.config does not define: INVALID_ARGUMENT, as TF Serving answers
    ("Unrecognized servable version label"), not NOT_FOUND."""

    code = "unknown_version_label"


class UnknownSignature(InvalidRequest):
    """A Predict names a signature the version does not serve. FAILED_PRECONDITION over
    gRPC, as TF Serving's predict_util.cc answers ("Serving signature key ... not found");
    400 over REST, as its JSON parsing answers there."""

    code = "unknown_signature"
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class LabelOnUnavailableVersion(InvalidRequest):
    """A config that moves a label to a version not AVAILABLE: FAILED_PRECONDITION, as
    TF Serving's server_core.cc answers ("Request to assign label to version ..., which
    is not currently available for inference")."""

    code = "label_on_unavailable_version"
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class UnsupportedMediaType(InvalidRequest):
    code = "unsupported_media_type"
    http_status = 415


class Unauthenticated(CnnserveError):
    """No API key, or one the server does not know (CNNSERVE_API_KEYS)."""

    code = "unauthenticated"
    server_fault = False
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class ApiKeysUnavailable(Unauthenticated):
    """The key a request presents cannot be checked: this worker has not read
    CNNSERVE_API_KEYS_FILE (it could not at its start). Fails closed, retryably: a 503,
    not a 401 telling a client its good key is wrong. Under Unauthenticated because it is
    the answer of the same check, which every transport handles as that. Logged once by
    the key file's poll (service.api.auth), not per request."""

    code = "api_keys_unavailable"
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    retry_after = 10  # the key file's default poll period


class NotFound(CnnserveError):
    code = "not_found"
    server_fault = False
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class ModelNotFound(NotFound):
    code = "model_not_found"


class VersionNotFound(NotFound):
    code = "version_not_found"


class VersionGone(VersionNotFound):
    """The model backend (TF Serving) no longer serves a version the gateway routed to:
    it unloads on its own poll, the gateway learns on its next. A request that named no
    version is routed again (service.dataplane); one that named it gets this 404."""


class Overloaded(CnnserveError):
    """Shed at admission: the work ahead cannot finish in time. ``reason`` (one of
    ``SHED_REASONS``) labels the shed-count metric."""

    code = "overloaded"
    server_fault = False
    http_status = 503
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after = 1

    def __init__(
        self,
        message: str,
        *,
        detail: str | None = None,
        reason: str = "queue_full",
        move: bool = False,
    ) -> None:
        super().__init__(message, detail=detail)
        self.reason = reason
        # Close the HTTP connection after the answer: another worker of the replica has
        # room (service.concurrency.ConcurrencyLimit.refusal).
        self.move = move


class DeadlineExceeded(CnnserveError):
    code = "deadline_exceeded"
    server_fault = False
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class ClientClosedRequest(CnnserveError):
    """The client left before sending its whole request: nginx's 499, in the metrics and
    access log only (there is no one to answer), and no error log line: a client that
    hangs up is not the server's fault."""

    code = "client_closed_request"
    server_fault = False
    http_status = 499
    grpc_code = grpc.StatusCode.CANCELLED


class Unavailable(CnnserveError):
    code = "unavailable"
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    retry_after = 1


class ShuttingDown(Unavailable):
    """A call refused while the server stops (SIGTERM): expected, so no warning each
    (a client retrying against a stopping replica wrote ~100 a second)."""

    server_fault = False


class ModelNotReady(Unavailable):
    code = "model_not_ready"
    # The registry logs why once (a failed load, nothing to serve); a warning per
    # refused request flooded the log (5,049 lines in 5 s from one client).
    server_fault = False


class BackendUnavailable(Unavailable):
    code = "backend_unavailable"
    # Logged once per change by the source's poll (service.sources), and counted in
    # cnnserve_backend_up: a warning per request flooded the log (3,420 lines in 13 s).
    server_fault = False


class BackendError(CnnserveError):
    """The model backend (TF Serving) failed a call in a way no retry mends, or answered
    what this version cannot answer (other columns, non-finite scores): it serves
    another model than the repository's version, or it broke. 502, as a proxy answers
    for a bad upstream; the message names the fault, the address stays in the log."""

    code = "backend_error"
    http_status = 502
    # Logged once per distinct fault by the runtime (service.runtimes.tfserving) and
    # counted in cnnserve_requests{code="502"}: a warning per request flooded the log.
    server_fault = False


class InternalError(CnnserveError):
    """A fault of the server's; its message may name files, addresses or exceptions."""

    code = "internal"
    expose_message = False


class ModelLoadError(InternalError):
    code = "model_load_failed"


class LoadTimedOut(ModelLoadError):
    """A version's load outlasted CNNSERVE_LOAD_TIMEOUT_SECONDS: a read that hangs, which
    may mend by itself (a network file system back), so it is tried again later."""


class ExportError(InternalError):
    code = "export_failed"


class ConfigError(InternalError):
    """A repository config file that TF Serving would refuse too."""

    code = "invalid_config"


class DatasetError(CnnserveError):
    """A training dataset that cannot be read; the CLI prints it and exits 2."""

    code = "dataset_error"
    # Never sent to a client; room to list the files at fault, one a line.
    message_limit = 8 * MAX_MESSAGE_CHARS


class PromotionError(CnnserveError):
    """`cnnserve promote` cannot go on; the message says what to do."""

    code = "promotion_failed"


class VersionFailedToLoad(PromotionError):
    """The version `cnnserve promote` waited for failed to load; the load step is undone."""


class NoServer(PromotionError):
    """No server answered while `cnnserve promote` waited for a version to be AVAILABLE."""

    code = "no_server"


def http_status(error: CnnserveError) -> int:
    return error.http_status


def grpc_status(error: CnnserveError) -> grpc.StatusCode:
    return error.grpc_code
