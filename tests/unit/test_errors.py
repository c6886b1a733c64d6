"""The one error table: every error has a stable code, an HTTP and a gRPC status."""

from __future__ import annotations

import grpc
import pytest

from service.errors import CnnserveError, grpc_status, http_status


def _all_errors(cls: type[CnnserveError] = CnnserveError) -> list[type[CnnserveError]]:
    return [cls] + [sub for child in cls.__subclasses__() for sub in _all_errors(child)]


@pytest.mark.parametrize("error", _all_errors(), ids=lambda e: e.__name__)
def test_every_error_maps_to_an_http_and_a_grpc_status(error: type[CnnserveError]) -> None:
    instance = error("x")
    assert 400 <= http_status(instance) < 600
    assert grpc_status(instance) not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN)
    # Clients may retry exactly the errors the table marks retryable, on both transports.
    if instance.retry_after is not None:
        assert http_status(instance) == 503
