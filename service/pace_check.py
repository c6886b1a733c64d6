"""Whether holding refusals slows the clients that retry them at once.

The refusal pace (:class:`service.concurrency.ConcurrencyLimit`) holds the 503s of
clients whose next request comes as soon as the last was refused. A closed loop (wrk,
hey, a retry loop, a test harness that waits for each answer) then sends no faster than
the pace answers it, and the worker's CPU stays with the admitted requests: one worker on
a core of its own, 512 such connections, 622 served a second paced against 126 unpaced.

A client that sends at its own rate whatever the answers take (an open loop: k6's
arrival-rate executors, vegeta, producers fanning out) is not slowed. It opens another
connection for each request a held one would have carried, thousands of them, and its
503s wait up to the pace's longest wait. One worker on a core of its own, an open loop
of keep-alive connections at 4x what it serves: held, 503s p50 30-160 ms and p90 2 s,
3,900-5,700 connections opened in 10 s; let go, 6-7 ms and 18-230 ms, 1,000-2,000
connections, for the same goodput.

So a new overload's refusals are let go first: answered at once, counted in windows of
:data:`PROBE_SECONDS` against the images the worker answers meanwhile. While a window
counts no more than :data:`PROBE_RATIO` for each image answered (an open loop at a few
times what the worker serves: ~4.5 at 4x), they stay let go, however long the overload
lasts: holding them would save no CPU. Clients retrying at once, let go, take the CPU
from the answers, and their refusals outnumber them by far (~70 to one): once a window
passes the ratio (at once when it passes it by :data:`PROBE_ALLOWANCE`), the pace holds
them (verdict ``many_refusals``) and the check below tells whether holding slows them.
A few clients spinning stay under the ratio, so the window after the first let go, and
one in every :data:`SLOW_EVERY` after, is slowed: each retry at once is answered
:data:`SLOW_DELAY_SECONDS` later. Clients that wait for their 503s then come
:data:`SLOW_FACTOR` times slower or more, and are held (verdict ``closed_loop``); an
open loop keeps its rate.
One worker, the default model, an open loop at 4x for 10 s, 3 runs each against
holding first: 67-71% of capacity served against 64-66%, 580-660 connections opened
against 3,650-3,830, 503 p90 9 ms against 1.1-1.3 s; wrk at 128 and 512 connections
served as before (86-88% and 83-84%). A pace under :data:`MIN_RATE` is never let go
first: too few are held to check (``let_go_first``).

The two look the same while held (each connection sends its next request as soon as its
503 comes), but not when let go: a closed loop comes back at once, many times faster; an
open loop keeps its rate. So once the pace's wait has passed :data:`CHECK_WAIT_SECONDS`,
the worker counts the refusals that arrive, held, in windows of :data:`BASELINE_SECONDS`
until their rate stops falling (a closed loop slows as the pace takes hold of it) with
:data:`RETRY_SHARE` of them or more known retries at once: that rate is the baseline.
Then it answers refusals at once and counts them in windows of :data:`WINDOW_SECONDS`.
The first is not judged (an open loop that waited for new connections sends what it
kept). In the second, more than :data:`SPIN_FACTOR` times the baseline is a closed loop
(more than :data:`KEPT_SPIN_FACTOR` times if most came on connections kept from before):
the pace holds again, and the next check waits :data:`RECHECK_SECONDS`. Fewer is an open
loop: answered at once for :data:`OPEN_SECONDS` while no window passes the factor, then
judged by the probe's windows (held again, and checked again, if they pass the ratio);
each open verdict in a row lets go twice as long as the last, up to
:data:`MAX_OPEN_SECONDS`. Refusals stopping for :data:`PAUSE_SECONDS` end
it (the overload is over); a shorter stall starts the windows again. A mistake either
way costs a window or two. Refusals not
known as retries count too (let go, a closed loop whose own loop is busy comes back
later than a retry counts as at once), but not a new connection's retry answered at once
because its host's wait passed its bound (ConcurrencyLimit.refusal_delay says why).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

from service import metrics

log = logging.getLogger(__name__)

# The pace's wait that starts a check: ~125 clients retrying at once on a worker at the
# default pace (500 a second); fewer are held for no longer than a quarter of a second.
CHECK_WAIT_SECONDS = 0.25
# How long retries are counted, held, for the rate a check compares with; it is taken
# once a window's is no less than this share of the window's before.
BASELINE_SECONDS = 0.5
STEADY_SHARE = 0.8
# ...and once this share of them at least are known retries at once (which the pace
# holds, or would: a new connection's by its host). A closed loop whose clients' own
# loop is too busy to resend within the retry window is not held: it is let go already,
# and letting it go tells nothing (512 connections of one Python process, let go after
# an open loop, stayed let go: 98-114 served a second against 674-784). The price: an
# open loop whose pool grew large while held reuses its connections later than that
# window too, and is not checked either (held as before; 5 of 8 runs of an audit).
RETRY_SHARE = 0.5
# Fewer refusals a second (in the pace's tokens) are not checked: too few to count in a
# window, and too few to cost much held (at the default pace, a closed loop held sends
# ~500 a second).
MIN_RATE = 200.0
# A window of refusals answered at once: long enough for ~40 at the least rate checked,
# short enough that a closed loop let go spins for two at most (one worker, 128-512
# connections: told within 20-80 ms of the second).
WINDOW_SECONDS = 0.2
# Refusals arriving this many times faster once answered at once: a closed loop (one
# worker, 512 keep-alive connections: ~9-13x the rate held; wrk opening a connection per
# request, bounded by the worker's accepts: ~5x); an open loop's stay near 1x (up to
# 1.8x seen in a window at 2x, which judged some open loops closed).
SPIN_FACTOR = 3.0
# ...unless most of them came on connections kept from before (not a new connection's
# first request): then up to this. An open loop whose pool ran dry while held sent most
# of its requests on new connections, answered at once past their host's bound and not
# counted, so its baseline was about a third of its rate; let go, it sends on the
# connections it opened, ~3x the baseline, and was judged closed and held again (503
# p50 up to 2 s): 2 of 10 runs at 4.1x, 2 of 3 at 4.8x. Clients opening a connection
# per request come back on new connections (2-5x); keep-alive ones on theirs, 9-21x.
KEPT_SPIN_FACTOR = 6.0
RECHECK_SECONDS = 10.0
OPEN_SECONDS = 10.0
# Each check costs an open loop what holding it does (one worker, an open loop at 4.1x
# for 60 s: 5 checks, 13,000-14,600 connections opened, 503 p90 48-98 ms; 3 checks with
# this, 8,400-8,800 and 11 ms), so each open verdict in a row lets go twice as long as
# the last, up to this; a closed verdict, or refusals stopping for PAUSE_SECONDS (the
# overload over), starts again from OPEN_SECONDS. The price: a closed loop that joins an
# open one let go, and does not pass the factor, spins this long.
MAX_OPEN_SECONDS = 40.0
# Once an open loop is let go, a new connection's first request that waited this long in
# the accept queue is not counted: the connections it opened while held, queued a
# thousand deep, arrive as the worker drains them, faster than it sends, and made the
# windows pass the factor: one worker, an open loop at 4.1x, judged closed and held
# again in 1 of 4 runs (503 p50 2 s, 8,000-18,000 connections).
QUEUED_SECONDS = 0.25
# Refusals stopping this long: the overload is over (let go: hold again; the next open
# verdict lets go OPEN_SECONDS again). A shorter gap is a stall of the clients or of the
# worker (a VM's CPU taken away, a long collection): let go, the windows start again, the
# first after it not judged (what queued meanwhile arrives at once). A gap of two windows
# ended the let-go: the worker stopped for 0.3 s, an open loop at 3x was held again and
# measured again, its 503s at 1.4-2 s for 1.5 s after and 720-830 connections opened
# against ~415 (and, once in CI, held to the end of a test that expects it let go).
PAUSE_SECONDS = 1.0
# A new overload's refusals are answered at once first, counted in windows of this long
# against the images the worker answers meanwhile: long enough for a few batches of
# answers at the least rate checked (MIN_RATE), short enough that clients spinning at
# once take a worker's CPU for a moment only (one worker, 128 of wrk's connections
# let go: 26% of capacity served while it lasts).
PROBE_SECONDS = 0.4
# Refusals (in the pace's tokens) a window may count for each image answered and stay let
# go. An open loop at k times what a worker serves is refused about k - 1 times for each
# answer whatever the model (4x: 4.5 per answer, 3,180 against 705 a second), and
# holding its refusals saves nothing; clients retrying at once take the CPU until the
# refusals outnumber the answers by far more (128 of wrk's connections: ~70 to one).
PROBE_RATIO = 8.0
# A window is cut short, and held, once its refusals pass PROBE_RATIO per image answered
# by this many tokens: clients spinning by the hundred come back so fast that, let go for
# a whole window, they took the event loop past what a retry at once is timed by
# (RETRY_AT_ONCE_SECONDS: 512 of wrk's connections came back 10 ms or more after their
# 503s), were no longer known as retries, and spun unpaced to the end (one worker: 7% of
# capacity served). An open loop's first answers come a batch after its first refusals:
# at 4x, ~100 refused before them.
PROBE_ALLOWANCE = 2 * MIN_RATE * PROBE_SECONDS
# Every this many windows let go, the probe slows the next for SLOW_SECONDS: each retry at
# once is answered after SLOW_DELAY_SECONDS. Clients waiting for their 503s to send again
# come that much slower (a closed loop of a few spinning clients stays under PROBE_RATIO:
# one worker, wrk at 44 connections let go, ~4 refused for each answer, 8,549 served in
# 12 s against ~10,600 paced); an open loop keeps its rate, opening a few more
# connections for the while (~70 at 3,300 refused a second). The first window let go is
# followed by one.
SLOW_EVERY = 5
SLOW_SECONDS = 0.2
SLOW_DELAY_SECONDS = 0.02
# A slowed window counting this many times fewer refusals a second than the window let go
# before it is a closed loop (a few clients spinning every ~4 ms, slowed by 20 ms: ~6x
# fewer); an open loop's windows differ by a fifth at most.
SLOW_FACTOR = 2.0
# One log line per verdict per this long at most: a worker flipping between the two
# shows both (the counter shows how often).
LOG_INTERVAL_SECONDS = 60.0


class _State(enum.Enum):
    HOLDING = "holding"  # refusals wait for the pace
    MEASURING = "measuring"  # held, their retries counted for the baseline
    LETTING_GO = "letting_go"  # answered at once, their retries counted against it
    PROBING = "probing"  # answered at once, counted against the worker's answers


class PaceCheck:
    """One worker's check (event loop only: no lock). :meth:`holds` is asked for each
    refusal, with what it costs in the pace's tokens and the pace's wait now; its clock
    is the pace's."""

    def __init__(self, clock: Callable[[], float], let_go_first: bool = True) -> None:
        self._clock = clock
        self._state = _State.HOLDING
        # Whether a new overload's refusals are answered at once first (a pace under
        # MIN_RATE holds too few to check: its refusals are all held, as configured).
        self._let_go_first = let_go_first
        self._probe = let_go_first  # whether the next refusal held starts a probe
        self._answered = 0.0  # the images answered since the current window began
        self._shown_let_go = False  # what cnnserve_refusal_pace_let_go reads
        # The wait of a retry at once that holds() lets go: SLOW_DELAY_SECONDS while a
        # probe's window is slowed, else 0 (ConcurrencyLimit.refusal_delay reads it); a
        # new window (_begin) or holding (_hold) ends it.
        self.delay = 0.0
        self._let_go_rate = 0.0  # the refusals a second of its last window let go
        self._next_check = 0.0  # the clock's time from which a check may start
        self._since = 0.0  # when the current measure or window began
        self._count = 0.0  # the tokens of refusals counted since then
        self._retries = 0.0  # those of them known as retries at once
        self._new = 0.0  # those of them a new connection's first request (let go)
        self._baseline = 0.0  # tokens a second, held
        self._previous: float | None = None  # the rate of the last window measured
        self._open_until: float | None = None  # an open loop found: let go until then
        self._open_seconds = OPEN_SECONDS  # how long the next open verdict lets go
        self._last = -float("inf")  # when the last refusal was asked about
        self._windows = 0  # the windows let go so far (the probe's, or after a baseline)
        self._logged_at: dict[str, float] = {}  # when each verdict was last logged

    def holds(
        self, cost: float, wait: float, retry: bool, queued: float = 0.0, first: bool = True
    ) -> bool:
        """Whether this refusal may wait for the pace, if its client retries at once
        (False: answer it at once, taking no turn). ``cost``: its tokens; ``wait``: the
        pace's wait now, in seconds; ``retry``: whether its client is known to retry at
        once (by its connection, or a new connection's by its host), as the pace holds;
        ``queued``: how long it waited in the accept queue (a new connection's first
        request; else 0); ``first``: whether it is a new connection's first request (True
        when not known: gRPC's calls, the app's 503s, the counting of old)."""
        now = self._clock()
        gap, self._last = now - self._last, now
        if gap > PAUSE_SECONDS:  # a new overload: no open loop seen yet, let go first
            self._open_seconds = OPEN_SECONDS
            self._probe = self._let_go_first
        state = self._state
        if state is _State.HOLDING:
            if self._probe and wait > 0.0:  # the first refusal the pace would hold
                self._probe = False
                self._let_go(now)
                self._count = cost
                return False
            if wait >= CHECK_WAIT_SECONDS and now >= self._next_check:
                self._previous = None
                self._begin(_State.MEASURING, now)
            return True
        elapsed = now - self._since
        if state is _State.PROBING:
            return self._probed(cost, now, elapsed, gap)
        if state is _State.MEASURING:
            if elapsed > 2 * BASELINE_SECONDS or wait < CHECK_WAIT_SECONDS:
                # Refusals stopped for a while, or the overload passed: no baseline.
                self._state = _State.HOLDING
                return True
            self._count += cost
            if retry:
                self._retries += cost
            if elapsed < BASELINE_SECONDS:
                return True
            rate, previous = self._count / elapsed, self._previous
            if (
                previous is None
                or rate < STEADY_SHARE * previous
                or rate < MIN_RATE
                or self._retries < RETRY_SHARE * self._count
            ):
                # A closed loop's retries slow down as the pace takes hold of them (each
                # client cycles once a wait): the baseline is their rate once it has.
                self._previous = rate
                self._begin(_State.MEASURING, now)
                return True
            self._baseline = rate
            self._open_until = None
            self._windows = 0
            self._begin(_State.LETTING_GO, now)
            return False
        if gap > PAUSE_SECONDS:  # the overload was over: nothing to tell
            self._hold(next_check=now)
            return True
        if elapsed > 2 * WINDOW_SECONDS:  # a stall: the windows start again
            self._windows = 0
            self._begin(_State.LETTING_GO, now)
            elapsed = 0.0
        if self._open_until is None or queued < QUEUED_SECONDS:
            self._count += cost
            if first:
                self._new += cost
        held_window = self._baseline * WINDOW_SECONDS
        if (
            self._windows
            and self._count > SPIN_FACTOR * held_window
            and (2 * self._new >= self._count or self._count > KEPT_SPIN_FACTOR * held_window)
        ):
            # A closed loop. Found once let go for an open loop, the baseline may be
            # outgrown (the open loop's rate rose): measured again at once.
            found_open = self._open_until is not None
            self._verdict(now, "closed_loop", recheck=0.0 if found_open else RECHECK_SECONDS)
            return True
        if elapsed >= WINDOW_SECONDS:
            self._windows += 1
            if self._open_until is None and self._windows == 2:
                self._verdict(now, "open_loop")
            elif self._open_until is not None and now >= self._open_until:
                self._let_go(now)  # let go its while: the probe's windows judge it now
                return False
            self._begin(_State.LETTING_GO, now)
        return False

    def answered(self, images: int) -> None:
        """The worker answered an admitted request of ``images`` (what a probe's refusals
        are counted against)."""
        self._answered += images

    def expire(self) -> None:
        """Hold again once refusals stopped while let go, and go from an open loop's let
        go to the probe's windows once it has run its while: :meth:`holds` runs only as
        refusals come, and after an open loop's last refusal
        `cnnserve_refusal_pace_let_go` read 1 on an idle worker."""
        state = self._state
        if state is not _State.LETTING_GO and state is not _State.PROBING:
            return
        now = self._clock()
        if now - self._last > PAUSE_SECONDS:
            self._hold(next_check=now)
        elif self._open_until is not None and now >= self._open_until:
            self._let_go(now)

    def _probed(self, cost: float, now: float, elapsed: float, gap: float) -> bool:
        """A probe's refusal (answered at once): held once a window's refusals came at
        MIN_RATE or more and outnumbered the images answered meanwhile PROBE_RATIO to
        one (as soon as they do by PROBE_ALLOWANCE). Clients retrying at once then take
        the worker's CPU, or load so far past what it serves that the check may as well
        measure whether holding slows it."""
        if gap > PAUSE_SECONDS or elapsed > 2 * PROBE_SECONDS:  # a stall: start again
            self._begin(_State.PROBING, now)
            elapsed = 0.0
        self._count += cost
        if self.delay:
            return self._slowed(now, elapsed)
        per_image = self._count / max(1.0, self._answered)
        ended = elapsed >= PROBE_SECONDS
        if self._count > PROBE_RATIO * self._answered + PROBE_ALLOWANCE or (
            ended and self._count >= MIN_RATE * elapsed and per_image > PROBE_RATIO
        ):
            self._verdict(now, "many_refusals", recheck=0.0, per_image=per_image)
            return True
        if not ended:
            return False
        self._windows += 1
        rate = self._count / elapsed
        self._begin(_State.PROBING, now)
        if self._windows % SLOW_EVERY == 1 and rate >= MIN_RATE:
            self._let_go_rate = rate
            self.delay = SLOW_DELAY_SECONDS
        return False

    def _slowed(self, now: float, elapsed: float) -> bool:
        """A refusal of a slowed window (its retries at once wait SLOW_DELAY_SECONDS):
        at its end, held if its rate fell SLOW_FACTOR times below the window let go
        before it (clients waiting for their 503s: a closed loop)."""
        if elapsed < SLOW_SECONDS:
            return False
        rate = self._count / elapsed
        if rate * SLOW_FACTOR < self._let_go_rate:
            self._verdict(now, "closed_loop", slowed_rate=rate)
            return True
        self._begin(_State.PROBING, now)
        return False

    def _let_go(self, now: float) -> None:
        """Answer refusals at once, the probe's windows judging them from ``now``."""
        self._open_until = None
        self._windows = 0
        self._show_let_go(True)
        self._begin(_State.PROBING, now)

    def _begin(self, state: _State, now: float) -> None:
        self.delay = 0.0  # a slowed window lasts one window
        self._state = state
        self._since = now
        self._count = 0.0
        self._retries = 0.0
        self._new = 0.0
        self._answered = 0.0

    def _hold(self, next_check: float) -> None:
        self.delay = 0.0
        self._show_let_go(False)
        self._state = _State.HOLDING
        self._next_check = next_check
        self._open_until = None

    def _show_let_go(self, let_go: bool) -> None:
        if let_go != self._shown_let_go:
            self._shown_let_go = let_go
            metrics.set_refusals_let_go(let_go)

    def _verdict(
        self,
        now: float,
        verdict: metrics.PaceVerdict,
        recheck: float = RECHECK_SECONDS,
        per_image: float = 0.0,
        slowed_rate: float | None = None,
    ) -> None:
        metrics.observe_pace_check(verdict)
        let_go_for = self._open_seconds
        if verdict == "open_loop":
            self._open_until = now + let_go_for
            self._open_seconds = min(2 * let_go_for, MAX_OPEN_SECONDS)
            self._show_let_go(True)
        else:
            if verdict == "closed_loop":
                self._open_seconds = OPEN_SECONDS
            self._hold(next_check=now + recheck)
        logged = self._logged_at.get(verdict)
        if logged is not None and now - logged < LOG_INTERVAL_SECONDS:
            return
        self._logged_at[verdict] = now
        if verdict == "open_loop":
            log.info(
                "refusals are answered at once for %.0f s: let go, they did not come faster "
                "than the %.0f a second held (an open loop, which holding them only makes "
                "open more connections)",
                let_go_for,
                self._baseline,
            )
        elif slowed_rate is not None:
            log.info(
                "refusals wait for the pace: let go, they came %.0f a second, and %.0f with "
                "each retry answered %.0f ms later (clients waiting for their 503s to "
                "retry at once); checked again in %.0f s",
                self._let_go_rate,
                slowed_rate,
                SLOW_DELAY_SECONDS * 1000,
                recheck,
            )
        elif verdict == "closed_loop":
            log.info(
                "refusals wait for the pace: let go, they came over %.0f times faster than "
                "the %.0f a second held (clients retrying at once); checked again in %.0f s",
                SPIN_FACTOR,
                self._baseline,
                recheck,
            )
        else:
            log.info(
                "refusals wait for the pace: answered at once, they came %.0f for each image "
                "answered, over %.0f (clients retrying at once, or load far past what the "
                "worker serves); checking whether holding them slows those clients",
                per_image,
                PROBE_RATIO,
            )
