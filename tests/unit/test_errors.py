"""The one error table: what a client sees of each error, on both transports."""

from __future__ import annotations

import grpc
import pytest

from service import errors
from service.errors import MAX_MESSAGE_CHARS, CnnserveError, ModelNotFound


def _all_errors(cls: type[CnnserveError] = CnnserveError) -> list[type[CnnserveError]]:
    return [cls] + [sub for child in cls.__subclasses__() for sub in _all_errors(child)]


@pytest.mark.parametrize("error", _all_errors(), ids=lambda e: e.__name__)
def test_retryable_errors_are_the_503s_and_map_to_retryable_grpc_codes(
    error: type[CnnserveError],
) -> None:
    retryable = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
    if error.retry_after is not None:
        assert error.http_status == 503 and error.grpc_code in retryable


def test_internal_details_are_kept_from_clients_and_given_to_the_log() -> None:
    error = errors.InternalError("KeyError at /srv/models/x", detail="traceback ...")
    assert error.public_message() == errors.HIDDEN_MESSAGE
    assert error.to_dict() == {"error": {"code": "internal", "message": errors.HIDDEN_MESSAGE}}
    assert "KeyError" in error.log_message() and "traceback" in error.log_message()
    # A subclass inherits the rule: a failed load or a bad config names files.
    assert errors.ModelLoadError("x").public_message() == errors.HIDDEN_MESSAGE
    assert errors.ConfigError("x").public_message() == errors.HIDDEN_MESSAGE


@pytest.mark.parametrize(
    "error",
    [
        errors.DeadlineExceeded("the request deadline passed while it waited for a batch"),
        errors.Overloaded("queue full; retry"),
        errors.ModelNotReady("still loading; retry shortly"),
        errors.BackendUnavailable("the model backend cannot be reached", detail="10.0.0.7:8500"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_5xx_that_tell_the_client_what_to_do_show_their_message(error: CnnserveError) -> None:
    assert error.public_message() == error.message
    assert error.detail is None or error.detail not in error.public_message()


def test_a_message_echoing_a_huge_client_value_keeps_its_start_and_end() -> None:
    error = ModelNotFound(f"no model named {'x' * 17_000!r}; models: ['tiny']")
    message = error.public_message()
    assert len(message) <= MAX_MESSAGE_CHARS + 60
    assert message.startswith("no model named 'xxx") and message.endswith("models: ['tiny']")
    assert "characters left out" in message
    assert ModelNotFound("short").public_message() == "short"
