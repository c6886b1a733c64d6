"""What the HTTP protocol answers as a request's headers are parsed
(service.api.http.EarlyRefusal): its status, its turn of the refusal pace, and its
record; on a moved clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import pytest

from service.api.header_room import HeaderRoomCheck
from service.api.http import Admission, EarlyRefusal, Refused
from service.concurrency import ConcurrencyLimit
from service.config import Settings
from service.dataplane import DataPlane
from service.errors import CnnserveError, DeadlineExceeded, Overloaded
from service.requestlog import RequestRecord, note_target, recording


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def paced() -> ConcurrencyLimit:
    """A worker pacing 100 refusals a second, its burst of 5 spent: the next 503 waits
    10 ms."""
    limit = ConcurrencyLimit(1, refusals_per_second=100, clock=Clock())
    for _ in range(5):
        assert limit.refusal_delay() == 0.0
    return limit


def early(limit: ConcurrencyLimit, check: Callable[[], CnnserveError | None]) -> EarlyRefusal:
    return EarlyRefusal(
        Admission(max_body_bytes=1 << 20, concurrency=limit), frozenset(), (), lambda *_: check
    )


def refuse(refusal: EarlyRefusal) -> Refused:
    refused = refusal("POST", "/v1/classify", b"", [(b"content-length", b"600000")], True)
    assert refused is not None
    return refused


def test_the_room_checks_answer_keeps_its_status_and_only_a_503_is_paced() -> None:
    limit = paced()
    refused = refuse(early(limit, lambda: DeadlineExceeded("too late")))
    assert (refused.status, refused.delay) == (504, 0.0)
    assert b"deadline_exceeded" in refused.body
    assert limit.refusal_delay() == pytest.approx(0.01)  # the 504 took no turn
    busy = early(limit, lambda: Overloaded("busy"))
    # Its turn, and no more: the body it announces costs the pace only as it comes.
    assert (refuse(busy).status, refuse(busy).delay) == (503, pytest.approx(0.03))
    assert early(limit, lambda: None)("POST", "/v1/classify", b"", [], True) is None
    # Probes are never refused, whatever the room check would say.
    assert busy("GET", "/readyz", b"", [], True) is None


@pytest.mark.parametrize(
    ("method", "path", "refused"),
    [
        ("GET", "/", False),  # the demo page and its files: it opens under load
        ("HEAD", "/", False),
        ("GET", "/demo/static/demo.js", False),
        ("GET", "/demo/static/demo.css", False),
        ("GET", "/demo/models", False),  # its list of models, from memory
        ("GET", "/v1/models/fashion_mnist", False),  # a model's status, as before
        ("POST", "/", True),  # not the page
        ("POST", "/demo/models", True),
        ("GET", "/demo/models/fashion_mnist/versions/1/card", True),  # read from disk
        ("GET", "/demo/models/fashion_mnist/versions/1/samples", True),
        ("GET", "/docs", True),  # the API's pages load megabytes of script
        ("GET", "/openapi.json", True),
        ("GET", "/demo/staticx", True),
        ("POST", "/v1/classify", True),
    ],
)
def test_a_full_worker_refuses_all_but_the_pages_own_loads_and_status(
    method: str, path: str, refused: bool
) -> None:
    limit = ConcurrencyLimit(1)
    assert limit.try_acquire() is not None  # full: the next request has no place
    refusal = early(limit, lambda: None)(method, path, b"", [], False)
    assert (refusal is not None) == refused
    if refusal is not None:
        assert refusal.status == 503 and b"overloaded" in refusal.body


def test_the_room_check_runs_with_the_requests_own_record() -> None:
    """What the check learns (the model and version that would answer) goes on the
    refused request's record, not on whichever record was current on the loop (on
    asyncio's loop, the last request answered on it)."""

    def check() -> CnnserveError | None:
        note_target("fashion_mnist", 3)
        return Overloaded("busy")

    answered = RequestRecord("earlier", "rest", "POST")
    with recording(answered):
        refused = refuse(early(paced(), check))
    assert (refused.record.model, refused.record.version) == ("fashion_mnist", "3")
    assert (answered.model, answered.version) == ("", "")


class Plane:
    """What HeaderRoomCheck asks of the data plane: its settings, deadlines, and the
    room check (recorded)."""

    def __init__(self, canary_percent: float) -> None:
        self.settings = Settings(canary_percent=canary_percent)
        self.checked: list[tuple[str | None, int | None, str | None, str | None]] = []

    def deadline(self, timeout: float | None) -> float:
        return 1e9

    def check_room(
        self, model: str | None, version: int | None, label: str | None, _: float, key: str | None
    ) -> None:
        self.checked.append((model, version, label, key))


@pytest.mark.parametrize(
    ("query", "key", "with_split"),
    [
        (b"", None, False),  # the split draws at random: the route's draw decides
        (b"version=2", None, True),
        (b"label=stable", None, True),
        (b"", b"client-7", True),  # a client key keeps the client on one side
    ],
)
def test_an_unkeyed_request_under_a_canary_split_is_left_to_the_route(
    query: bytes, key: bytes | None, with_split: bool
) -> None:
    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"x-client-key", key))
    admission = Admission(max_body_bytes=1 << 20)
    for percent, checked in ((10.0, with_split), (0.0, True)):
        plane = Plane(percent)
        check = HeaderRoomCheck(admission, cast(DataPlane, plane))(
            "POST", "/v1/classify", query, headers
        )
        assert (check is not None) == checked, (percent, query, key)
        if check is not None:
            assert check() is None and len(plane.checked) == 1


def test_a_503_is_made_once_for_each_message_and_path_shape_and_move(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its headers and body are built once (~12% of a refusal's CPU, thousands a second
    under an open loop), and still each answer is what error_response makes of its
    error: its own message, TF Serving's shape under /v1/models, the connection closed
    and counted for each move; other errors are made each time."""
    from service import metrics
    from service.api import http
    from service.api.http import error_response

    moves: list[None] = []
    monkeypatch.setattr(metrics, "observe_moved_connection", lambda: moves.append(None))
    made_for: list[str] = []

    def counted(error: CnnserveError, path: str = "") -> object:
        made_for.append(error.message)
        return error_response(error, path)

    monkeypatch.setattr(http, "error_response", counted)
    errors = iter(
        [Overloaded("busy, 3"), Overloaded("busy, 3"), Overloaded("busy, 4")]
        + [Overloaded("busy, 3", move=True)] * 3
        + [DeadlineExceeded("late"), DeadlineExceeded("later")]
    )
    refusal = early(paced(), lambda: next(errors))

    def answer(path: str = "/v1/classify") -> tuple[list[tuple[bytes, bytes]], bytes]:
        refused = refusal("POST", path, b"", [], True)
        assert refused is not None
        return [h for h in refused.headers if h[0] != b"x-request-id"], refused.body

    first, same, other = answer(), answer(), answer()
    assert first == same and first[1] != other[1] and b"busy, 4" in other[1]
    assert made_for == ["busy, 3", "busy, 4"]  # the second "busy, 3" was made once
    made = error_response(Overloaded("busy, 3"))
    assert first == (made.raw_headers, bytes(made.body))
    moved = [answer(), answer(), answer("/v1/models/m:predict")]
    assert all((b"connection", b"close") in headers for headers, _ in moved)
    assert len(moves) == 3  # each move counted, the second's made from the first's
    assert moved[2][1] == b'{"error":"busy, 3"}'  # TF Serving's shape there
    assert b'"late"' in answer()[1] and b'"later"' in answer()[1]
