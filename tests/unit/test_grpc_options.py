"""The gRPC server's options that bound what one connection holds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.api.grpc_server import call_cap, server_options
from service.concurrency import MAX_REFUSAL_WAIT_SECONDS
from service.config import Settings


def streams(**settings: object) -> int:
    options = dict(server_options(Settings(**settings)))  # type: ignore[arg-type]
    # Counted as HTTP/2 counts them: gRPC's own counting reset calls within the limit.
    assert options["grpc.http.overload_protection"] == 0
    return int(options["grpc.max_concurrent_streams"])


def test_a_connection_holds_what_the_worker_infers_at_once_by_default() -> None:
    assert streams() == 32  # a batch
    assert streams(max_batch_size=1, num_batch_threads=64) == 64
    assert streams(max_batch_size=1) == 8  # room beside a health Watch
    assert streams(grpc_max_concurrent_streams=2) == 2


def test_one_stream_is_refused_for_the_watch_beside_it() -> None:
    with pytest.raises(ValidationError, match="health Watch"):
        Settings(grpc_max_concurrent_streams=1)


@pytest.mark.parametrize(
    "settings",
    [
        Settings(),
        Settings(max_concurrent_requests=2),
        Settings(max_concurrent_requests=2, max_refusals_per_second=0),
    ],
)
def test_grpcs_own_cap_is_above_what_admission_holds_at_its_pace(settings: Settings) -> None:
    """Calls admitted, refusals waiting their turn (at most MAX_REFUSAL_WAIT_SECONDS of
    the pace) and health Watches all fit below gRPC's core cap, so its uncounted
    RESOURCE_EXHAUSTED is only a backstop (at twice a limit of 2, it answered most)."""
    waiting = settings.max_refusals_per_second * MAX_REFUSAL_WAIT_SECONDS
    cap = call_cap(settings)
    assert cap >= settings.max_concurrent_requests + waiting + settings.max_health_watches
    assert cap >= 2 * settings.max_concurrent_requests + settings.max_health_watches
