"""What the HTTP protocol answers as a request's headers are parsed
(service.api.http.EarlyRefusal): its status, and the turn it takes from the refusal pace,
weighted by the body it drops; on a moved clock."""

from __future__ import annotations

import pytest

from service.api.http import Admission, EarlyRefusal, Refused
from service.concurrency import REFUSAL_BODY_BYTES, ConcurrencyLimit
from service.errors import CnnserveError, DeadlineExceeded, Overloaded

MAX_BODY = 10 * REFUSAL_BODY_BYTES


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def full_worker(room: CnnserveError | None = None) -> tuple[EarlyRefusal, ConcurrencyLimit]:
    """A worker whose one place is taken, pacing 100 refusals a second (a burst of 5,
    spent here), and a room check answering ``room``."""
    limit = ConcurrencyLimit(1, refusals_per_second=100, clock=Clock())
    assert limit.try_acquire() is not None
    for _ in range(5):
        assert limit.refusal_delay() == 0.0
    admission = Admission(max_body_bytes=MAX_BODY, concurrency=limit)
    return EarlyRefusal(admission, frozenset(), (), lambda *_: room), limit


def refuse(early: EarlyRefusal, *headers: tuple[bytes, bytes]) -> Refused:
    refused = early("POST", "/v1/classify", b"", [(b"host", b"x"), *headers], True)
    assert refused is not None
    return refused


def test_a_refusal_takes_a_turn_per_body_it_drops() -> None:
    early, _ = full_worker()
    length = str(3 * REFUSAL_BODY_BYTES).encode()
    # One turn for the refusal, three for its body: 40 ms at 100 a second.
    assert refuse(early, (b"content-length", length)).delay == pytest.approx(0.04)
    assert refuse(early).delay == pytest.approx(0.05)  # no body: one turn more
    # Waiting for "100 Continue", the client sends no body to a refusal.
    expecting = refuse(early, (b"content-length", length), (b"expect", b"100-continue"))
    assert expecting.delay == pytest.approx(0.06)
    # A length past the body limit costs what the limit allows, no more.
    huge = refuse(early, (b"content-length", b"9" * 30)).delay
    assert huge == pytest.approx(0.06 + (1 + MAX_BODY / REFUSAL_BODY_BYTES) / 100)


def test_the_room_checks_answer_keeps_its_status_and_only_a_503_is_paced() -> None:
    limit = ConcurrencyLimit(1, refusals_per_second=100, clock=Clock())
    for _ in range(5):
        limit.refusal_delay()  # the burst is spent: the next 503 waits 10 ms
    admission = Admission(max_body_bytes=MAX_BODY, concurrency=limit)
    late = EarlyRefusal(admission, frozenset(), (), lambda *_: DeadlineExceeded("too late"))
    refused = refuse(late, (b"content-length", b"600000"))
    assert (refused.status, refused.delay) == (504, 0.0)
    assert b"deadline_exceeded" in refused.body
    assert limit.refusal_delay() == pytest.approx(0.01)  # the 504 took no turn
    busy = EarlyRefusal(admission, frozenset(), (), lambda *_: Overloaded("busy"))
    assert refuse(busy).status == 503
    free = EarlyRefusal(admission, frozenset(), (), lambda *_: None)
    assert free("POST", "/v1/classify", b"", [], True) is None  # room: the request goes on
    # Probes are never refused, whatever the room check would say.
    assert busy("GET", "/readyz", b"", [], True) is None
