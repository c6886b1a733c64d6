"""The pace check (service.pace_check) on a moved clock: refusals arriving at set rates,
held or let go as a closed loop's and an open loop's would."""

from __future__ import annotations

import itertools
import logging

import pytest
from prometheus_client import REGISTRY

from service import pace_check
from service.concurrency import ConcurrencyLimit
from service.pace_check import (
    BASELINE_SECONDS,
    MAX_OPEN_SECONDS,
    MIN_RATE,
    OPEN_SECONDS,
    PAUSE_SECONDS,
    PROBE_ALLOWANCE,
    PROBE_RATIO,
    PROBE_SECONDS,
    RECHECK_SECONDS,
    SLOW_DELAY_SECONDS,
    SLOW_EVERY,
    SLOW_SECONDS,
    WINDOW_SECONDS,
    PaceCheck,
)

WAITING = 1.0  # the pace's wait while the overload lasts: past CHECK_WAIT_SECONDS


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def arrive(
    check: PaceCheck,
    clock: Clock,
    rate: float,
    seconds: float,
    wait: float = WAITING,
    retry: bool = True,
    queued: float = 0.0,
    first: bool = True,
    served: float = 0.0,
) -> list[bool]:
    """Refusals at ``rate`` a second for ``seconds``: what :meth:`PaceCheck.holds` said
    to each (``retry``: whether their clients are known to retry at once; ``queued``:
    how long each waited in the accept queue; ``first``: whether each is a new
    connection's first request, True when not known), while the worker answers
    ``served`` images a second."""
    answers = []
    owed = 0.0
    for _ in range(round(rate * seconds)):
        clock.now += 1 / rate
        owed += served / rate
        if owed >= 1.0:
            check.answered(int(owed))
            owed -= int(owed)
        answers.append(check.holds(1.0, wait, retry, queued, first))
    return answers


def measured(clock: Clock) -> PaceCheck:
    """A check that holds a new overload's refusals from the first (as with a pace under
    MIN_RATE): the measured check alone, which a probe finding many refusals leads to."""
    return PaceCheck(clock, let_go_first=False)


def held_then_let_go(answers: list[bool]) -> bool:
    """Whether ``answers`` are held (True) up to some refusal and let go (False) from it."""
    return (
        False in answers
        and all(answers[: answers.index(False)])
        and not any(answers[answers.index(False) :])
    )


def verdicts(kind: str) -> float:
    value = REGISTRY.get_sample_value("cnnserve_refusal_pace_checks_total", {"verdict": kind})
    return value or 0.0


def let_go() -> float | None:
    return REGISTRY.get_sample_value("cnnserve_refusal_pace_let_go")


def test_an_open_loop_few_times_past_capacity_is_never_held() -> None:
    """A new overload's refusals are answered at once first, and stay so while each
    window counts no more than PROBE_RATIO of them for each image answered: an open loop
    at ~4x what the worker serves (one worker, the default model: 3,180 refused and 705
    answered a second) is never held, and opens no more connections than it needs."""
    clock = Clock()
    check = PaceCheck(clock)
    before = {v: verdicts(v) for v in ("open_loop", "closed_loop", "many_refusals")}
    assert not any(arrive(check, clock, 3200, 3 * MAX_OPEN_SECONDS, served=700))
    assert let_go() == 1
    assert {v: verdicts(v) for v in before} == before  # nothing to measure


def test_a_few_clients_spinning_under_the_ratio_are_held_once_slowed_windows_slow_them() -> None:
    """A few clients retrying at once (wrk at 44 connections on one worker: ~4 refused
    for each answer) stay under PROBE_RATIO, and let go they served ~20% fewer. The
    window after the first let go is slowed: each retry at once waits SLOW_DELAY_SECONDS,
    and clients waiting for their 503s come that much slower (~6x fewer): held."""
    clock = Clock()
    check = PaceCheck(clock)
    closed = verdicts("closed_loop")
    assert not any(arrive(check, clock, 2800, PROBE_SECONDS + 0.001, served=700))
    assert check.delay == SLOW_DELAY_SECONDS  # the slowed window
    slowed = arrive(check, clock, 450, SLOW_SECONDS + 0.05, served=700)
    held = slowed.index(True)  # at the window's end
    assert held == pytest.approx(450 * SLOW_SECONDS, abs=2) and all(slowed[held:])
    assert verdicts("closed_loop") == closed + 1 and check.delay == 0.0 and let_go() == 0


def test_an_open_loop_keeps_its_rate_through_the_slowed_windows() -> None:
    """An open loop sends as much whatever the 503s take: slowed windows (one in each
    SLOW_EVERY + 1) find nothing, and delay a tenth of its refusals by 20 ms."""
    clock = Clock()
    check = PaceCheck(clock)
    before = {v: verdicts(v) for v in ("open_loop", "closed_loop", "many_refusals")}
    delays = []
    for i in range(3200 * 10):
        clock.now += 1 / 3200
        if i % 4 == 0:
            check.answered(1)  # 800 answered a second
        assert check.holds(1.0, WAITING, True) is False
        delays.append(check.delay)
    share = delays.count(SLOW_DELAY_SECONDS) / len(delays)
    expected = SLOW_SECONDS / (SLOW_EVERY * PROBE_SECONDS + SLOW_SECONDS)
    assert share == pytest.approx(expected, rel=0.2) and set(delays) == {0.0, SLOW_DELAY_SECONDS}
    assert {v: verdicts(v) for v in before} == before


def test_clients_spinning_when_let_go_first_are_held_then_measured() -> None:
    """Clients retrying at once take the worker's CPU once let go: their refusals
    outnumber the answers by far (128 of wrk's connections: ~70 to one). Held after a
    window, and measured as before: held, then let go, they spin and are held again. A
    new overload, after a pause, is let go first again."""
    clock = Clock()
    check = PaceCheck(clock)
    many, closed = verdicts("many_refusals"), verdicts("closed_loop")
    spun = arrive(check, clock, 18_000, PROBE_SECONDS, served=250)
    held = spun.index(True)  # once past the answers' allowance: in a hundredth of a second
    assert held < 18_000 * 0.02 and all(spun[held:])
    assert verdicts("many_refusals") == many + 1 and let_go() == 0
    # Held at the pace, they slow to it: measured, let go, and found spinning.
    assert until(check, clock, 500, held=False) < 4 * BASELINE_SECONDS
    arrive(check, clock, 5000, WINDOW_SECONDS)
    assert arrive(check, clock, 5000, WINDOW_SECONDS)[-1] is True
    assert verdicts("closed_loop") == closed + 1
    clock.now += PAUSE_SECONDS + 0.01
    assert not any(arrive(check, clock, 3000, 2 * PROBE_SECONDS, served=1000))


def test_spinning_clients_joining_an_open_loop_let_go_first_are_held() -> None:
    clock = Clock()
    check = PaceCheck(clock)
    many = verdicts("many_refusals")
    assert not any(arrive(check, clock, 3200, 5.0, served=700))
    joined = arrive(check, clock, 20_000, 2 * PROBE_SECONDS, served=300)
    assert True in joined and joined.index(True) < 20_000 * 2 * PROBE_SECONDS * 0.75
    assert verdicts("many_refusals") == many + 1


def test_refusals_too_few_to_count_are_let_go() -> None:
    """Under MIN_RATE a second they cost the worker little whoever sends them, even
    with no answer beside them."""
    clock = Clock()
    check = PaceCheck(clock)
    assert not any(arrive(check, clock, MIN_RATE * 0.75, 5.0))


def test_a_slowed_windows_retries_wait_and_other_refusals_do_not() -> None:
    """Through ConcurrencyLimit.refusal_delay: while a probe's window is slowed, a retry
    at once waits SLOW_DELAY_SECONDS (within its deadline), a refusal not known as one
    is answered at once."""
    clock = Clock()
    limit = ConcurrencyLimit(1, refusals_per_second=500, clock=clock)
    began, delay = clock.now, 0.0
    for i in itertools.count():  # let go (within the bucket's burst), ~4 per answer
        clock.now += 1 / 2800
        if i % 4 == 0:
            taken = limit.try_acquire()
            assert taken is not None
            limit.release(taken)
        delay = limit.refusal_delay(True)
        if delay >= 0.01:
            break
        assert clock.now - began < PROBE_SECONDS + 0.05
    assert delay == SLOW_DELAY_SECONDS and clock.now - began > PROBE_SECONDS
    assert limit.refusal_delay(True) == SLOW_DELAY_SECONDS
    assert limit.refusal_delay(False) == 0.0
    assert limit.refusal_delay(True, within=0.015) == pytest.approx(0.9 * 0.015)


@pytest.mark.parametrize("pace", [500.0, MIN_RATE / 2])
def test_a_pace_under_the_checks_least_rate_holds_from_the_first(pace: float) -> None:
    """Through ConcurrencyLimit: its answers are what the probe counts against (an open
    loop at ~4x its answers, let go), unless its pace is under MIN_RATE, too few held to
    check: then held from the first refusal past the burst, as configured."""
    clock = Clock()
    limit = ConcurrencyLimit(1, refusals_per_second=pace, clock=clock)
    delays = []
    for i in range(3000 * 2):  # 3,000 refused a second, 750 answered
        clock.now += 1 / 3000
        if i % 4 == 0:
            taken = limit.try_acquire()
            assert taken is not None
            limit.release(taken)
        delays.append(limit.refusal_delay(True))
    assert (max(delays) > 0.5) is (pace < MIN_RATE), max(delays)
    assert PROBE_RATIO * 750 > 3000  # what the probe compares


def test_a_closed_loop_let_go_comes_back_faster_and_is_held_again() -> None:
    clock = Clock()
    check = measured(clock)
    closed = verdicts("closed_loop")
    # Held at the pace: two windows at the same rate make the baseline, then let go.
    assert held_then_let_go(arrive(check, clock, 500, 2 * BASELINE_SECONDS + 0.01))
    # Let go, its clients spin ten times faster: the first window is not judged...
    assert not any(arrive(check, clock, 5000, WINDOW_SECONDS))
    # ...the second tells within 3 x 500 x 0.2 = 300 refusals, and the pace holds again.
    second = arrive(check, clock, 5000, WINDOW_SECONDS)
    assert True in second and second.index(True) <= 300 and all(second[second.index(True) :])
    assert verdicts("closed_loop") == closed + 1
    # Held as before, no check again for RECHECK_SECONDS, however long the wait.
    assert all(arrive(check, clock, 500, RECHECK_SECONDS - 0.1))
    # Then a check again: measured held, then let go.
    assert held_then_let_go(arrive(check, clock, 500, 0.2 + 2 * BASELINE_SECONDS))


def test_an_open_loop_let_go_keeps_its_rate_and_is_answered_at_once_for_a_while() -> None:
    clock = Clock()
    check = measured(clock)
    opened = verdicts("open_loop")
    assert held_then_let_go(arrive(check, clock, 2000, 2 * BASELINE_SECONDS + 0.01))
    # Let go at the same rate (a first window up to the factor: what it kept, sent).
    assert not any(arrive(check, clock, 3900, WINDOW_SECONDS))
    assert not any(arrive(check, clock, 2000, WINDOW_SECONDS + 0.001))
    assert verdicts("open_loop") == opened + 1 and let_go() == 1
    # Answered at once for OPEN_SECONDS, then the probe's windows judge it: here the
    # worker answers nothing, so its refusals outnumber the answers; held and measured.
    many = verdicts("many_refusals")
    rest = arrive(check, clock, 2000, OPEN_SECONDS + PROBE_SECONDS)
    held = rest.index(True)
    assert held == pytest.approx(2000 * OPEN_SECONDS + PROBE_ALLOWANCE, abs=2000 * WINDOW_SECONDS)
    assert all(rest[held:]) and verdicts("many_refusals") == many + 1 and let_go() == 0
    assert held_then_let_go(arrive(check, clock, 2000, 2 * BASELINE_SECONDS + 0.01))


def test_an_open_loop_let_go_for_its_while_stays_let_go_while_its_refusals_are_few() -> None:
    """Once an open verdict's while has run, the probe's windows judge the refusals
    against the worker's answers, not held: an open loop at ~4x (3 refused for each
    answer) stays let go, and measuring it again would only hold it (each check opened
    it thousands of connections)."""
    clock = Clock()
    check = measured(clock)
    open_loop_let_go(check, clock, 2100, OPEN_SECONDS - 2 * WINDOW_SECONDS)
    assert not any(arrive(check, clock, 2100, 5 * OPEN_SECONDS, served=700))
    assert let_go() == 1


def open_loop_let_go(check: PaceCheck, clock: Clock, rate: float, seconds: float) -> None:
    """An open loop at ``rate`` from a held worker: measured, let go for two windows,
    then answered at once for ``seconds`` more (asserted)."""
    arrive(check, clock, rate, 2 * BASELINE_SECONDS + 0.01)
    arrive(check, clock, rate, 2 * WINDOW_SECONDS + 0.01)
    assert not any(arrive(check, clock, rate, seconds))


def found_open(check: PaceCheck, clock: Clock, rate: float) -> float:
    """An open loop at ``rate`` from a held worker: measured, let go and judged open
    (asserted); then how long, from the verdict, it was let go before held again (by
    the probe after its while, once past its allowance: the worker answers none here)."""
    opened = verdicts("open_loop")
    assert until(check, clock, rate, held=False) < 4 * BASELINE_SECONDS  # measured
    arrive(check, clock, rate, 2 * WINDOW_SECONDS + 0.001)
    assert verdicts("open_loop") == opened + 1
    return until(check, clock, rate, held=True)


def until(check: PaceCheck, clock: Clock, rate: float, held: bool) -> float:
    """Seconds of refusals at ``rate`` until one is ``held`` (or not), a minute at most."""
    began = clock.now
    while check.holds(1.0, WAITING, True) is not held:
        assert clock.now - began < 60.0
        clock.now += 1 / rate
    return clock.now - began


def test_an_open_loop_found_again_and_again_is_let_go_longer_each_time() -> None:
    """Each check costs an open loop what holding it does: one worker, 60 s at 4.1x,
    5 checks opened 13,000-14,600 connections (503 p90 48-98 ms), 3 opened ~8,500."""
    clock = Clock()
    check = measured(clock)
    spans = [found_open(check, clock, 2000) for _ in range(5)]
    expected = [OPEN_SECONDS, 2 * OPEN_SECONDS, 4 * OPEN_SECONDS, MAX_OPEN_SECONDS]
    expected = [span + PROBE_ALLOWANCE / 2000 for span in [*expected, MAX_OPEN_SECONDS]]
    assert spans == pytest.approx(expected, abs=WINDOW_SECONDS)


def test_the_let_go_is_short_again_after_a_closed_verdict_or_a_pause() -> None:
    clock = Clock()
    check = measured(clock)
    probed = PROBE_ALLOWANCE / 2000  # the probe's allowance after the let-go's while
    first, twice = OPEN_SECONDS + probed, 2 * OPEN_SECONDS + probed
    assert found_open(check, clock, 2000) == pytest.approx(first, abs=WINDOW_SECONDS)
    assert found_open(check, clock, 2000) == pytest.approx(twice, abs=WINDOW_SECONDS)
    clock.now += PAUSE_SECONDS + WINDOW_SECONDS  # the overload ended; a new one comes
    assert found_open(check, clock, 2000) == pytest.approx(first, abs=WINDOW_SECONDS)
    # Found open (the next let-go would be twice as long), then clients retrying at
    # once join it and are found: the open loop alone again is let go the first while.
    closed = verdicts("closed_loop")
    arrive(check, clock, 1000, 2 * BASELINE_SECONDS + 0.01)
    assert not any(arrive(check, clock, 1000, 1.0))
    joined = arrive(check, clock, 4000, WINDOW_SECONDS)
    assert joined[-1] is True and verdicts("closed_loop") == closed + 1
    assert found_open(check, clock, 1000) == pytest.approx(first, abs=WINDOW_SECONDS)


@pytest.mark.parametrize("trial", [False, True], ids=["found open", "before the verdict"])
def test_a_stall_while_an_open_loop_is_let_go_does_not_hold_it_again(trial: bool) -> None:
    """The clients or the worker stop for a while (a VM's CPU taken away, a long
    collection) and what queued meanwhile arrives at once: the windows start again, the
    first not judged. Ended by a gap of two windows, an open loop at 3x was held again
    (its 503s at 1.4-2 s, once to the end of a test expecting them at once)."""
    clock = Clock()
    check = measured(clock)
    closed, opened = verdicts("closed_loop"), verdicts("open_loop")
    arrive(check, clock, 1000, 2 * BASELINE_SECONDS + 0.01)  # measured: let go
    arrive(check, clock, 1000, (1 if trial else 2) * WINDOW_SECONDS + 0.01)
    assert verdicts("open_loop") == opened + (0 if trial else 1)
    for stall in (0.3, PAUSE_SECONDS - 0.05):
        clock.now += stall
        # The event loop's timer (ConcurrencyLimit.watch_event_loop) runs first after a
        # stall of the worker's, then what queued meanwhile (on kept connections), then
        # the open loop at its rate: none held.
        check.expire()
        assert not any(arrive(check, clock, 10_000, stall / 10, first=False))
        assert not any(arrive(check, clock, 1000, 4 * WINDOW_SECONDS, first=False))
    assert verdicts("open_loop") == opened + 1 and verdicts("closed_loop") == closed
    assert let_go() == 1
    # Refusals stop for longer: the overload is over, and the next one is held.
    clock.now += PAUSE_SECONDS + 0.01
    check.expire()
    assert let_go() == 0
    assert all(arrive(check, clock, 1000, BASELINE_SECONDS))


def test_an_open_loop_whose_pool_ran_dry_while_held_is_let_go() -> None:
    """Held, most of its requests came on new connections, answered at once and not
    counted: the baseline is a third of its rate. Let go, it sends on the connections it
    opened, ~3x the baseline: judged closed and held again (503 p50 up to 2 s) in 2 of 3
    runs at 4.8x. On kept connections up to KEPT_SPIN_FACTOR is an open loop's."""
    clock = Clock()
    check = measured(clock)
    closed, opened = verdicts("closed_loop"), verdicts("open_loop")
    arrive(check, clock, 1300, 2 * BASELINE_SECONDS + 0.01, first=False)
    assert not any(arrive(check, clock, 4200, 2 * WINDOW_SECONDS + 0.01, first=False))
    assert verdicts("open_loop") == opened + 1 and verdicts("closed_loop") == closed


@pytest.mark.parametrize(
    ("rate", "new_share"),
    [(6500, 0.0), (2000, 0.75)],
    ids=["keep-alive clients spinning", "clients opening a connection per request"],
)
def test_a_closed_loop_let_go_is_held_again_on_kept_or_new_connections(
    rate: float, new_share: float
) -> None:
    """Keep-alive clients come back on their connections 9-21x as fast as held (13x
    here); those that open a connection per request on new ones, 2-5x (4x here)."""
    clock = Clock()
    check = measured(clock)
    closed = verdicts("closed_loop")
    arrive(check, clock, 500, 2 * BASELINE_SECONDS + 0.01, first=False)
    arrive(check, clock, rate, WINDOW_SECONDS, first=False)  # the first: not judged
    answers = []
    for i in range(round(WINDOW_SECONDS * rate)):
        clock.now += 1 / rate
        first = i % 4 < round(4 * new_share)
        answers.append(check.holds(1.0, WAITING, True, 0.0, first))
    assert answers[-1] is True and verdicts("closed_loop") == closed + 1


def test_an_open_loop_let_go_is_not_judged_on_the_connections_it_queued_while_held() -> None:
    """Held, an open loop opens connections faster than the worker accepts them; let go,
    their first requests arrive as the worker drains the accept queue, faster than it
    sends, and were counted: judged a closed loop and held again in 1 of 4 runs (503 p50
    2 s). Once it is let go, a first request that waited in the queue does not count;
    clients spinning on their connections still do."""
    clock = Clock()
    check = measured(clock)
    closed = verdicts("closed_loop")
    open_loop_let_go(check, clock, 1000, 0.5)
    backlog = arrive(check, clock, 5000, 3 * WINDOW_SECONDS, queued=2.0)
    assert not any(backlog) and verdicts("closed_loop") == closed
    assert not any(arrive(check, clock, 1000, 0.5, queued=0.1))  # not long: counted
    spinning = arrive(check, clock, 5000, WINDOW_SECONDS)  # the same rate, not queued
    assert spinning[-1] is True and verdicts("closed_loop") == closed + 1


def test_a_queued_first_request_counts_before_an_open_loop_is_found() -> None:
    """Clients opening a connection per request and resending at once (wrk with
    ``Connection: close``) queue in the accept queue too: until an open loop is found
    their first requests count, and let go they are told from one."""
    clock = Clock()
    check = measured(clock)
    closed = verdicts("closed_loop")
    arrive(check, clock, 600, 2 * BASELINE_SECONDS + 0.01, queued=1.0)
    assert not any(arrive(check, clock, 3000, WINDOW_SECONDS, queued=1.0))  # unjudged
    assert True in arrive(check, clock, 3000, WINDOW_SECONDS, queued=1.0)
    assert verdicts("closed_loop") == closed + 1


def test_the_baseline_is_taken_once_the_pace_has_slowed_a_closed_loop() -> None:
    """At the start of an overload a closed loop spins before the pace holds it: a
    baseline taken then would be its unpaced rate, and let go it would look like an
    open loop (512 connections of a Python client, let go for 10 s)."""
    clock = Clock()
    check = measured(clock)
    for rate in (5000, 2000, 900, 600):  # each window a fifth or more below the last
        assert all(arrive(check, clock, rate, BASELINE_SECONDS))
    assert all(arrive(check, clock, 550, BASELINE_SECONDS - 0.01))
    assert arrive(check, clock, 550, 0.02)[-1] is False  # steady: let go
    assert not any(arrive(check, clock, 5000, WINDOW_SECONDS))
    assert True in arrive(check, clock, 5000, WINDOW_SECONDS)  # compared with ~550


def test_refusals_the_pace_does_not_hold_make_no_baseline() -> None:
    """Clients whose retries come later than a retry counts as at once (their own loop
    busy) are not held: they are let go already, and a check would tell nothing. After
    an open loop, 512 connections of one Python process spinning unpaced were taken for
    one and left unpaced (98-114 served a second against 674-784)."""
    clock = Clock()
    check = measured(clock)
    assert all(arrive(check, clock, 5000, 3.0, retry=False))
    # As the pace takes hold of them, half or more of them known retries: then checked.
    assert held_then_let_go(arrive(check, clock, 2500, 3 * BASELINE_SECONDS + 0.01))


def test_spinning_clients_let_go_with_an_open_loop_are_held_and_checked_at_once() -> None:
    clock = Clock()
    check = measured(clock)
    closed = verdicts("closed_loop")
    open_loop_let_go(check, clock, 1000, 1.0)
    # Clients retrying at once join it: the next window passes the factor.
    joined = arrive(check, clock, 4000, WINDOW_SECONDS)
    assert joined[-1] is True and verdicts("closed_loop") == closed + 1
    # Checked again at once (the open loop's rate may have risen): measured, held.
    assert all(arrive(check, clock, 4000, BASELINE_SECONDS - 0.01))


@pytest.mark.parametrize(
    ("rate", "wait"),
    [(150, WAITING), (2000, 0.1)],
    ids=["too few refusals to count", "a wait too short to cost"],
)
def test_no_check_below_its_thresholds(rate: float, wait: float) -> None:
    clock = Clock()
    check = measured(clock)
    assert all(arrive(check, clock, rate, 5.0, wait))


def test_a_check_ends_when_the_overload_or_its_refusals_stop() -> None:
    clock = Clock()
    check = measured(clock)
    assert all(arrive(check, clock, 2000, BASELINE_SECONDS / 2))  # measuring
    assert all(arrive(check, clock, 2000, 0.1, wait=0.0))  # the overload passed
    arrive(check, clock, 2000, 2 * BASELINE_SECONDS + 0.01)  # measured again, let go
    clock.now += PAUSE_SECONDS + 0.01  # no refusal for a while: nothing to tell
    assert check.holds(1.0, WAITING, True) is True


def test_each_verdict_is_logged_once_a_minute_at_most(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    check = PaceCheck(clock)
    with caplog.at_level(logging.INFO, logger=pace_check.__name__):
        for overload in range(3):  # three within a minute: a probe, then measured
            clock.now += PAUSE_SECONDS + 0.01 if overload else 0.0
            arrive(check, clock, 2000, PROBE_SECONDS + 0.01)  # many refusals, no answer
            until(check, clock, 2000, held=False)
            arrive(check, clock, 2000, 2 * WINDOW_SECONDS + 0.01)  # an open loop
        # Spinners join the last: a closed-loop verdict, logged too (one line a minute had
        # hidden a worker flipping between verdicts).
        arrive(check, clock, 20_000, WINDOW_SECONDS)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "answered at once" in lines[0] and "for each image answered" in lines[0]
    assert "answered at once" in lines[1] and "open loop" in lines[1]
    assert "wait for the pace" in lines[2] and "times faster" in lines[2]


def test_the_pace_lets_an_open_loop_go_and_holds_a_closed_one() -> None:
    """Through ConcurrencyLimit.refusal_delay: refusals of clients retrying at once wait
    their turn until the check finds an open loop, then come at once, taking no turn;
    clients not retrying at once count for the check too."""
    clock = Clock()
    limit = ConcurrencyLimit(1, refusals_per_second=500, clock=clock)

    def delays(rate: float, seconds: float, retrying: bool = True) -> list[float]:
        out = []
        for _ in range(round(rate * seconds)):
            clock.now += 1 / rate
            out.append(limit.refusal_delay(retrying))
        return out

    held = delays(2000, 1.5)
    assert max(held) > 0.5  # the wait grew past the check's threshold
    delays(2000, 2 * WINDOW_SECONDS + 0.01)
    assert set(delays(2000, 1.0)) == {0.0}  # an open loop: let go
    # A closed loop let go whose clients come back later than a retry counts as at once
    # (their own loop busy), ten times faster all the same: held again.
    limit = ConcurrencyLimit(1, refusals_per_second=500, clock=clock)
    # A new overload's refusals are let go first (a few within the bucket's burst)...
    assert max(delays(5000, 0.02)) < 0.01
    # ...and held once they outnumber the answers (none): the wait grows to ~1 s.
    assert max(delays(5000, 0.15)) > 0.5
    for _ in range(5000):  # then held at the pace, measured, until let go
        clock.now += 1 / 500
        if limit.refusal_delay() == 0.0:
            break
    else:
        pytest.fail("a closed loop held at the pace was never let go to be checked")
    delays(5000, 2 * WINDOW_SECONDS, retrying=False)
    assert min(delays(500, 1.5)) > 0.0


def test_a_new_connections_retry_past_the_hosts_bound_is_not_counted() -> None:
    """Clients opening a connection per request are judged by their host: held while
    the wait is under HOST_WAIT_SECONDS, answered at once past it (retrying None). Counted,
    those made the rate held read 1,600-2,500 a second, and let go such clients came back
    no faster than the worker accepted connections: closed loops judged open, let go."""
    clock = Clock()
    limit = ConcurrencyLimit(1, refusals_per_second=500, clock=clock)
    opened, closed = verdicts("open_loop"), verdicts("closed_loop")
    judged = []
    for _ in range(2000 * 3):  # a new connection every 0.5 ms, for 3 s
        clock.now += 1 / 2000
        record = limit.connection("10.0.0.1")
        judged.append(record.retrying(clock.now, first=True))
        limit.refusal_delay(judged[-1])
        record.refused(clock.now)
    assert None in judged  # past the host's bound at times: answered at once
    assert verdicts("closed_loop") >= closed + 1 and verdicts("open_loop") == opened


def test_letting_go_ends_when_refusals_stop() -> None:
    """The gauge went back to 0 only at a refusal: after an open loop's last, it read 1
    on an idle worker."""
    clock = Clock()
    check = measured(clock)
    arrive(check, clock, 2000, 2 * BASELINE_SECONDS + 0.01)
    arrive(check, clock, 2000, 2 * WINDOW_SECONDS + 0.01)
    assert let_go() == 1
    check.expire()  # refusals still coming: let go
    assert let_go() == 1
    clock.now += PAUSE_SECONDS + 0.01  # none since
    check.expire()
    assert let_go() == 0
    assert held_then_let_go(arrive(check, clock, 2000, 2 * BASELINE_SECONDS + 0.01))
