"""How many requests one worker handles at once, REST and gRPC together, and how fast
it refuses the rest.

A request over the limit is refused at once, before its body is read (503 +
Retry-After, gRPC RESOURCE_EXHAUSTED). The limit adapts to the latency budget
(``queue_wait_budget_seconds``): the target is the worker's share of it
(:data:`BUDGET_SHARE`) plus what a request alone takes (learnt from windows in which
requests came one at a time). After each window of answers (0.1 s and 16 answers at
least) the limit moves in proportion to target / p99 of the window's answers: down when
they were slower (from what the window held, by a fifth at most), up when they were
faster and the limit was full (by a quarter at most). It never goes below the requests
that carry half a batch of images (``max_batch_size`` / 2, divided by the images a
request of the window carried on average): that many images in flight wait about one
batch's inference at most, which admission cannot shorten without shrinking batches
(measured on a noisy 2-core host: with a quarter batch as the floor, host hiccups got up
to 1.6% of `cnnserve bench`'s saturating 32 connections refused; with a whole batch,
the admitted p99 at 4x the load reached 97-121 ms). A cut needing two slow windows in a
row was tried against the hiccups too, and dropped: it let the limit overshoot
(admitted p99 at 4x 60-153 ms against 58-67 ms without it). Counted in requests whatever
their images, the floor held 16 requests of 16 images (8 batches) in flight: at 4x such
requests the limit never moved, and their admitted p99 was 143-170 ms (target ~110).
The floor in images, and the target of requests of several images, wait for what a
request alone takes to be known (scaled up from the images those carried):
:meth:`ConcurrencyLimit._several_alone`. Nor does it go above the configured cap
(``max_concurrent_requests``), which bounds what a worker holds (memory, open bodies)
whatever the latency says; up to the cap, a worker at its limit may borrow the places
its sibling workers leave unused (service.siblings: which worker a connection lands on
is the kernel's choice). The event loop's lag (how late a 10 ms timer fires) is added to
the window's p99: a new request waits that long before anything times it. This extends
the batcher's admission (seconds of inference queued) to everything a request waits for
in a worker: under overload most of the wait is for the event loop and the CPU, which
the batch queue does not see.

Refusals themselves are paced. A client that retries a 503 at once, ignoring
Retry-After, comes straight back; a refusal costs the event loop ~0.04 ms even when
answered as the headers are parsed (service.api.http_protocol; ~0.07 ms through the
app), so a few dozen such clients would otherwise take the CPU from the admitted
requests (measured:
goodput at 4x the saturating load fell to ~45% with the limit sized to the budget and
unpaced refusals; docs/failure-modes.md). Each worker answers about
``max_refusals_per_second`` refusals (a token bucket; a burst of 50 ms worth is
answered at once; the body of a refused request counts one more per
:data:`REFUSAL_BODY_BYTES` as it is read, :meth:`ConcurrencyLimit.charge_body`, as its
bytes cost the CPU the refusal does); beyond that a refusal waits its turn (no CPU is
spent while it waits), so a storm of them takes a bounded share of the worker. Only a
client retrying at once waits (known per connection: :class:`ConnectionRefusals`; a new
connection's first request by its address, :class:`HostRefusals`, whichever of the
replica's workers refused it: service.shared_hosts); any
other refusal is answered at once and its token taken from the spinning clients'
turns, so a client that waits before retrying, or one turned away after an answered
request, is told in a millisecond however many others spin.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from service import metrics
from service.config import Settings
from service.errors import Overloaded
from service.pace_check import MIN_RATE, PaceCheck
from service.shared_hosts import SharedHosts
from service.siblings import Siblings

WINDOW_SECONDS = 0.1
# The share of the budget a worker's own answers may take at p99: the rest is for what it
# cannot time (the kernel's socket queues, the client). 2 workers, default model, wrk
# retrying at once, a probe beside it: at 4x the saturating load the probe's p99 was
# 61-154 ms aiming at the whole of a 50 ms budget, 47-57 ms at 0.7 of it; but 0.7 x 50 ms
# sat so close to the saturating load's own p99 (25-36 ms) that the bench's 32
# connections were refused 0.5-31% of the time. With the default budget at 80 ms and
# 0.6 of it (48 ms): none refused at 32, probe p99 59-61 ms at 4x, 57-68 ms at 16x.
BUDGET_SHARE = 0.6
WINDOW_ANSWERS = 16
MAX_CUT = 0.8  # a window cuts the limit to no less than this share of what it held
REFUSAL_BURST_SECONDS = 0.05  # refusals answered at once: this many seconds' worth
LAG_INTERVAL = 0.01  # how often the event loop's lag is sampled
LAG_WEIGHT = 0.2  # the lag's moving average (ConcurrencyLimit.lag): ~5 samples, ~50 ms
MAX_RAISE = 1.25  # a window raises the limit by at most a quarter
# An adapting limit starts at this many times its floor (a batch, by default), not at the
# cap: from the cap, a client opening 128 connections at once had them all admitted and
# answered in ~100 ms until the first windows cut it. Rising to the cap of 512 from 32
# takes about 1.3 s of full windows.
INITIAL_FLOORS = 2
ALONE_WEIGHT = 0.1  # moving average of what a request alone takes
# A client whose next request on a connection comes sooner than this after a refusal is
# retrying at once (Retry-After is a second): only its refusals wait for the pace. The
# setting's default (a round trip on a local network and the client's turnaround, with
# room for a loaded host), for limits made without a Settings object.
RETRY_AT_ONCE_SECONDS: float = Settings.model_fields["retry_at_once_seconds"].default
# Refusals answered without waiting may owe tokens up to this many seconds' worth: the
# wait they add to the spinning clients' stays within Retry-After (1 s).
MAX_REFUSAL_DEBT_SECONDS = 1.0
# No refusal waits longer than this for its turn, however many spinning clients queue
# (past ~1,000 of them on a worker at the default pace, refusals then go faster than the
# pace). Unbounded, clients that gave up on a held 503 and came back on new connections
# left their places in the queue: refusals waited 100 s, their 503s logged long after
# the shed counter had counted them, for clients long gone.
MAX_REFUSAL_WAIT_SECONDS = 2.0
# A worker borrows its siblings' unused places up to this many times its own limit: the
# limit is what its own event loop answers within the budget, and places borrowed do not
# make that loop faster. Unbounded, a client whose 128 connections the kernel split
# 118/10 had the first worker hold all 118 (its limit cut to 16, its sibling's at 512,
# never full): every answer took ~100 ms and none was refused, at 4x the load.
BORROW_FACTOR = 2
# A worker that refused a request this recently is shedding load (:meth:`ConcurrencyLimit.
# shedding`): the Retry-After it told, so one quiet moment does not end it.
SHEDDING_SECONDS = 1.0
# A worker holding this many requests (the one being answered among them) while a
# sibling holds none closes the answered request's connection (:meth:`ConcurrencyLimit.
# moves_answered`), at most once per MOVE_INTERVAL_SECONDS; it reads the siblings' table
# at most once per MOVE_CHECK_SECONDS.
MOVE_HELD = 2
MOVE_INTERVAL_SECONDS = 1.0
MOVE_CHECK_SECONDS = 0.1
MAX_PEERS = 4096  # gRPC connections whose refusals are remembered (ConcurrencyLimit.peer)
# A new connection's first request judged a retry by its host's refusals (HostRefusals)
# waits for the pace only while the wait is under this: a closed loop of up to ~250
# clients a worker reconnecting at once is slowed to the pace (500 a second), and an
# open loop's 503s wait no longer. 2 workers, wrk with `Connection: close` (closed loop)
# and an open loop of 3,000 new connections a second (about twice what they serve):
# with 0.25 s, 875 answered a second at 512 connections, open-loop 503s p90 370 ms;
# with 0.5 s, 999 and 610 ms; unbounded (2 s, the pace's own), 1,166 and 2.1 s.
HOST_WAIT_SECONDS = 0.5
# What a refused gRPC call costs the worker against a refused HTTP request, in the
# pace's tokens: grpc.aio takes ~0.4-0.6 ms of the event loop to start a handler and
# end its call, against ~0.04-0.09 ms for an HTTP refusal. Counted as one, gRPC
# clients retrying at once were refused at the pace, 500 a second, which took a
# quarter of a core from the admitted calls. 4 rather than that ratio (~8): a paced
# refusal holds one of its connection's streams while it waits, and callers sharing a
# connection queue their next calls behind it (at 16x, admitted p99 211-220 ms with 4,
# 268-290 with 8, 142-198 with 1; goodput at 4x 101-107% with either, 52-71% with 1).
GRPC_REFUSAL_COST = 4.0
# And its request message's bytes, which gRPC reads and parses whole before any handler
# runs: a bare grpc.aio server refusing every ClassifyBatch at once spent 0.28-0.30 ms
# a call with 3 KB messages, 0.44-0.46 ms with 196 KB (~0.8 us a KB, more than twice
# an HTTP body's): a token more per this many bytes.
GRPC_REFUSAL_BYTES = 100_000
# A paced refusal is answered by this share of what its client's deadline leaves, so
# that the answer reaches it in time.
DEADLINE_SHARE = 0.9
# A refused request's body is read (to be dropped, so that keep-alive goes on), and its
# bytes cost the worker as much as the refusal itself once they are this many: answered
# as the headers are parsed, 0.06-0.09 ms of CPU with an 18 KB body against 0.20-0.29 ms
# with a 580 KB one (1 worker, wrk, every request refused): ~0.3 us a KB beside 0.06 ms.
REFUSAL_BODY_BYTES = 200_000


class ConcurrencyLimit:
    """The worker's in-flight count against its limit (event loop only: no lock).

    With ``budget`` None the limit is the fixed ``cap``; with a budget it adapts, as the
    module says, between ``floor`` (in images: as many requests as carry that many) and
    ``cap``."""

    def __init__(
        self,
        cap: int,
        *,
        budget: float | None = None,
        floor: int = 1,
        refusals_per_second: float = 0.0,
        retry_at_once: float = RETRY_AT_ONCE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        siblings: Siblings | None = None,
        shared_hosts: SharedHosts | None = None,
        serving: bool = True,
    ) -> None:
        if cap < 1:
            raise ValueError(f"the concurrency limit must be at least 1, got {cap}")
        self.cap = cap
        self.in_flight = 0
        self.waiting = 0  # calls in gRPC's core, not taken yet (service.api.grpc_backlog)
        self.core_wait = 0.0  # about how long they wait there, at the last look
        self._budget = budget
        # The floor is in images; in requests, each window divides it by the images its
        # requests carried (_adapt).
        self._floor_images = max(1, min(floor, cap))
        # Adapting, it starts low and rises while windows show room (MAX_RAISE a window).
        self.limit = cap if budget is None else min(cap, INITIAL_FLOORS * self._floor_images)
        self._clock = clock
        self._siblings = siblings
        self._peers: dict[str, ConnectionRefusals] = {}
        # When each client host (a connection's peer address) was last refused: what a
        # new connection's first request is judged by (ConnectionRefusals.retrying).
        self._hosts = HostRefusals(retry_at_once, self._host_waits, shared_hosts)
        self._moving = False  # the last refusal found room in a sibling worker
        # The last deferred refusal made, by the places held and whether it moved its
        # client: under an open loop most refusals in a row are the same.
        self._refused_as: tuple[int, int, bool, Overloaded] | None = None
        self._move_next = 0.0  # when an answered connection may be moved next (clock's time)
        self._shed_at = -SHEDDING_SECONDS  # when admits() last said no (clock's time)
        self._retry_at_once = retry_at_once
        self._serving = serving
        self._publish()
        # Refusals are paced by a token bucket: ``_rate`` a second, bursts of ``_burst``.
        self._rate = refusals_per_second
        self._burst = max(1.0, refusals_per_second * REFUSAL_BURST_SECONDS)
        self._tokens = self._burst
        self._tokens_at = clock()
        # Whether holding refusals slows the clients retrying at once (service.pace_check).
        self._check = PaceCheck(clock, let_go_first=refusals_per_second >= MIN_RATE)
        # The current window: answer times, the most requests held, whether it refused.
        self._window_end = clock() + WINDOW_SECONDS
        self._answers: list[float] = []
        self._images = 0  # the images the window's answered requests carried
        self._held = 0
        self._full = False
        self._alone = 0.0  # what a request alone takes (moving average; 0 = not seen)
        self._alone_images = 0.0  # the images those requests carried (moving average)
        self._lag = 0.0  # the event loop's lag summed over the window's samples
        self._lag_samples = 0
        self.lag = 0.0  # the event loop's lag, a moving average of its samples
        # The estimated wait of calls in gRPC's core (waiting), summed over the window.
        self._wait = 0.0
        self._wait_looks = 0

    def try_acquire(self) -> float | None:
        """Take a place, unless the worker is at its limit: the time it was taken (hand
        it to :meth:`release`), or None. A window closes here, at the first arrival
        after it is due, so that the answers of requests let in together fall in one."""
        if not self.admits():
            return None
        now = self._clock()
        if now >= self._window_end and len(self._answers) >= WINDOW_ANSWERS:
            self._adapt(now)
            if not self.admits():
                return None
        self.in_flight += 1
        if self.in_flight + self.waiting > self._held:
            self._held = self.in_flight + self.waiting
        self._publish()
        if self.in_flight > self.limit:  # only a borrowed place lets it past the limit
            metrics.observe_borrowed_place()
        return now

    def admit(self, connection: ConnectionRefusals | None) -> float | None:
        """:meth:`try_acquire` for a request on ``connection`` (if known), whose earlier
        refusal is forgotten once it is admitted (it is no longer retrying at once)."""
        taken = self.try_acquire()
        if taken is not None and connection is not None:
            connection.passed()
        return taken

    def admits(self) -> bool:
        """Whether a request arriving now gets a place: under this worker's limit, or,
        at it, a place the replica's other workers leave unused (service.siblings), up
        to :data:`BORROW_FACTOR` times its limit and the cap. At the limit the window
        notes that it was full (what lets :func:`next_limit` raise it). For a refusal
        decided before :meth:`try_acquire` (service.api.http.EarlyRefusal) as for its
        own; a refusal while a sibling has room moves its client (:meth:`refusal`)."""
        if self.in_flight + self.waiting < self.limit:
            return True
        self._full = True
        now = self._clock()
        siblings = self._siblings
        if siblings is not None:
            room = siblings.spare(now) > 0
            if room and self.in_flight < min(self.cap, BORROW_FACTOR * self.limit):
                return True
            siblings.refused(now)
            self._moving = room
        self._shed_at = now
        return False

    def moves_answered(self) -> bool:
        """Whether the connection of a request answered now (one that held a place) is
        to close after its answer, so that its client's next connection may land on a
        sibling worker that holds no request: a keep-alive connection stays where the
        kernel put it, and 4 connections of 32-image requests split 0/4 had one worker
        serve them all while the other idled (38 answers a second against ~60 split
        2/2). At most once per :data:`MOVE_INTERVAL_SECONDS`: that bounds the churn of
        connections split evenly, whose siblings are idle for moments. The caller
        decides whether the connection loses nothing by closing
        (service.api.http.moves)."""
        siblings = self._siblings
        if siblings is None or self.in_flight < MOVE_HELD:
            return False
        now = self._clock()
        if now < self._move_next:
            return False
        # The table is read a few times a second at most, not at every answer.
        self._move_next = now + MOVE_CHECK_SECONDS
        if not siblings.idle(now):
            return False
        self._move_next = now + MOVE_INTERVAL_SECONDS
        return True

    def shedding(self) -> bool:
        """Whether this worker refused a request within :data:`SHEDDING_SECONDS`: the
        batcher then keeps its batches off the event loop, so that refusals are answered
        at once rather than after a batch (service.batching)."""
        return self._clock() - self._shed_at < SHEDDING_SECONDS

    def release(self, taken: float, images: int = 1) -> None:
        """An admitted request is answered (whatever the status); it carried ``images``
        (rows of a tensor alike; 1 when it named none)."""
        self.in_flight -= 1
        self._publish()
        self._check.answered(max(1, images))
        if self._budget is not None:
            self._answers.append(self._clock() - taken)
            self._images += max(1, images)

    def _adapt(self, now: float) -> None:
        assert self._budget is not None
        answers = sorted(self._answers)
        per_request = self._images / len(answers)
        # Every answer a request alone, nothing queued: what one takes alone. Unless the
        # limit was full at one: then it must still rise (a window holding one request
        # was only ever read as "alone", so a limit cut to 1 stayed there).
        if self._held <= 1 and not self._full:
            self._alone = _alone_average(self._alone, answers[len(answers) // 2])
            self._alone_images = _alone_average(self._alone_images, per_request)
        else:
            floor, alone = self._floor_images, self._alone
            if per_request > 1 and self._alone:
                floor = max(1, min(self.cap, int(self._floor_images / per_request)))
                alone = self._several_alone(per_request)
            # What a new request waits for the loop before anything times it.
            p99 = answers[min(len(answers) - 1, int(len(answers) * 0.99))]
            p99 += self._lag / max(1, self._lag_samples)
            p99 += self._wait / max(1, self._wait_looks)
            self.limit = next_limit(
                self.limit,
                held=self._held,
                full=self._full,
                p99=p99,
                target=self._budget * BUDGET_SHARE + alone,
                floor=floor,
                cap=self.cap,
            )
            metrics.set_concurrency_limit(self.limit)
            self._publish()
        self._answers = []
        self._images = 0
        self._lag = 0.0
        self._lag_samples = 0
        self._wait = 0.0
        self._wait_looks = 0
        self._held = self.in_flight + self.waiting
        self._full = False
        self._window_end = now + WINDOW_SECONDS

    def note_waiting(self, calls: int, wait: float) -> None:
        """``calls`` wait in gRPC's core for the worker to take them, the longest for
        about ``wait`` seconds (service.api.grpc_backlog): requests the worker holds, as
        those in flight (a request is admitted while the two together are under the
        limit), whose wait comes before anything times them, as the event loop's lag
        (added to the window's p99). Unseen, a client's 128 calls on 4 connections were
        all admitted and answered at p99 ~170 ms, none refused."""
        self.waiting = calls
        self.core_wait = wait
        self._wait += wait
        self._wait_looks += 1
        if self.in_flight + calls > self._held:
            self._held = self.in_flight + calls
        self._publish()

    def took_waiting(self) -> None:
        """One of the calls :meth:`note_waiting` counted was taken."""
        if self.waiting:
            self.waiting -= 1

    def _several_alone(self, per_request: float) -> float:
        """What a request of ``per_request`` images (on average, more than one) takes
        with nothing queued: what requests alone took, scaled up from the images those
        carried (a request of one image learnt it, a list of many costs more). The floor
        in images is only used once that is known: with it unknown (a worker never idle),
        the target understated such requests, and the limit of 16-image requests
        (default model, 1 worker) fell to 2-3 and refused 150-200 a second at 4
        connections, where the worker served them all before."""
        return self._alone * max(1.0, per_request / self._alone_images)

    def set_serving(self, serving: bool) -> None:
        """Whether this worker takes connections: until it does (a replacement loading
        its models listens only once it can answer) and from when its listeners close,
        its slot in the siblings' table reads as empty, so that no sibling borrows its
        places or moves clients towards it (it read as idle, holding nothing)."""
        self._serving = serving
        self._publish()

    def _publish(self) -> None:
        """Tell the sibling workers (service.siblings) what this one holds and allows."""
        if self._siblings is not None:
            held = self.in_flight + self.waiting
            if self._serving:
                self._siblings.publish(held, self.limit)
            else:  # no places to lend; what it holds over its limit still counts
                self._siblings.publish(max(0, held - self.limit), 0)

    def leave(self) -> None:
        """The worker stops: its places are no longer the replica's to borrow."""
        if self._siblings is not None:
            self._siblings.leave()
            self._siblings = None

    async def watch_event_loop(self) -> None:
        """Sample the event loop's lag (how late a timer fires) until cancelled: under
        load a request waits that long before its handler starts, which the answer
        times in :meth:`release` do not see."""
        while True:
            started = self._clock()
            await asyncio.sleep(LAG_INTERVAL)
            lag = max(0.0, self._clock() - started - LAG_INTERVAL)
            self._lag += lag
            self._lag_samples += 1
            self.lag += LAG_WEIGHT * (lag - self.lag)
            metrics.set_event_loop_lag(self.lag)
            self._check.expire()

    def refusal(self, *, deferred: bool = False) -> Overloaded:
        """What a request refused by :meth:`try_acquire` is told (and counted as).
        Refused while a sibling worker has room, the client is moved: its HTTP
        connection is closed after the 503, and its next one may land on that sibling
        (the kernel gives a new connection to whichever worker accepts first, most
        often one that is not busy). A keep-alive connection otherwise stays where it
        landed: a client that opened its connections at once saw them split 118/10.
        ``deferred``: counted with the loop's others (metrics.TurnTally), and never raised:
        the same object may be handed out again (the HTTP protocol answers it)."""
        metrics.observe_shed("", "concurrency", deferred=deferred)
        moving, self._moving = self._moving, False
        made = self._refused_as
        if deferred and made is not None and made[:3] == (self.in_flight, self.waiting, moving):
            return made[3]  # never raised: the protocol answers it (EarlyRefusal)
        refusal = Overloaded(
            f"this worker is handling {self.in_flight} requests"
            + (f" and {self.waiting} gRPC calls wait to be taken" if self.waiting else "")
            + ", its limit now "
            f"(CNNSERVE_MAX_CONCURRENT_REQUESTS caps it; it adapts to "
            f"CNNSERVE_QUEUE_WAIT_BUDGET_SECONDS); retry after the Retry-After delay "
            f"({Overloaded.retry_after} s) or send to another replica",
            reason="concurrency",
            move=moving,
        )
        if deferred:
            self._refused_as = (self.in_flight, self.waiting, moving, refusal)
        return refusal

    def refusal_delay(
        self,
        retrying: bool | None = True,
        cost: float = 1.0,
        within: float | None = None,
        queued: float = 0.0,
        first: bool = True,
    ) -> float:
        """Seconds this refusal waits for its turn: 0 within a burst, beyond it each waits
        for its token, at ``refusals_per_second``. A refusal of a client not known to be
        ``retrying`` at once (:class:`ConnectionRefusals`) never waits: it takes its
        token all the same, owing it if need be, so that the clients that spin wait for
        it instead, and the worker still answers about ``refusals_per_second``. What it
        may owe is bounded (:data:`MAX_REFUSAL_DEBT_SECONDS`) so that refusals which do
        not wait, however many, never make a spinning client wait longer than that; no
        wait is longer than :data:`MAX_REFUSAL_WAIT_SECONDS`, and none waits while the
        worker's check finds that waiting does not slow the clients it holds (an open
        loop: service.pace_check), which every refusal but a host's retry counts for.
        ``retrying`` None: a
        retry its wait would not slow (:class:`HostRefusals`), answered at once and
        taking no turn (owed, its turns would keep the wait past the host's bound).
        ``cost``: the tokens it takes, what it costs the worker against an HTTP refusal
        (:data:`GRPC_REFUSAL_COST`). ``within``: the seconds the client's deadline
        leaves (gRPC's, X-Request-Timeout), if it has one: the refusal is answered
        before it passes (but not sooner than ``retry_at_once``), its turn taken all
        the same (the client would wait that long anyway, and be told of a timeout where
        it could be told to back off). ``queued``: how long a new connection's first
        request waited in the accept queue, and ``first``: whether the refusal is of
        one (for the check: PaceCheck.holds)."""
        if not self._rate:
            return 0.0
        tokens = self._refilled()
        # The check counts refusals not known as retries too: let go, a closed loop's
        # clients may come back later than a retry counts as at once (their own loop
        # busy). Not a new connection's retry past the host's bound (None): answered at
        # once already, and let go, clients opening a connection per request come back
        # only as fast as the worker accepts connections (~2,300-4,000 a second against
        # 1,600-2,500 counted while held: such closed loops were let go, 7-23 served a
        # second against 213-307).
        if retrying is None:
            return 0.0
        wait = max(0.0, -tokens) / self._rate
        holds = self._check.holds(cost, wait, retrying, queued, first)
        if retrying is False:
            self._owe(tokens, cost)
            return 0.0
        if not holds:  # let go: at once, but while a probe slows them (PaceCheck.delay)
            delay = self._check.delay
        else:
            self._tokens = max(tokens - cost, -self._rate * MAX_REFUSAL_WAIT_SECONDS)
            # Owed (beyond float rounding): wait for the token.
            delay = -self._tokens / self._rate if self._tokens < -1e-9 else 0.0
        return delay if within is None or not delay else self.within_deadline(delay, within)

    def within_deadline(self, delay: float, within: float) -> float:
        """A refusal's ``delay`` (:meth:`refusal_delay`) cut to what the client's deadline
        leaves, ``within`` seconds: answered before it passes, but never sooner than a
        retry counts as at once: a short deadline must not let a client spin faster than
        one that waits that long between requests, whose refusals are not paced either."""
        return min(delay, max(DEADLINE_SHARE * within, self._retry_at_once))

    def charge_body(self, body_bytes: int) -> None:
        """The bytes of a body whose request was refused (503), as they are read (by the
        app, or to be dropped: keep-alive goes on): a token of the pace per
        :data:`REFUSAL_BODY_BYTES`, taken from the spinning clients' turns as a refusal
        answered at once takes its own, so that the pace bounds the CPU refusals take
        whatever their bodies weigh. Only bytes that came are charged: a length announced
        and not sent costs nothing."""
        if self._rate and body_bytes > 0:
            self._owe(self._refilled(), body_bytes / REFUSAL_BODY_BYTES)

    def _refilled(self) -> float:
        """The bucket's tokens now: what it held, plus what accrued since, up to a burst
        (kept: the bucket is refilled to now)."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._tokens_at) * self._rate)
        self._tokens_at = now
        return self._tokens

    def _owe(self, tokens: float, cost: float) -> None:
        """Take ``cost`` from ``tokens`` (refilled to now) without waiting, owing it if
        need be, at most :data:`MAX_REFUSAL_DEBT_SECONDS` worth."""
        self._tokens = min(tokens, max(tokens - cost, -self._rate * MAX_REFUSAL_DEBT_SECONDS))

    async def pace_refusal(
        self,
        retrying: bool | None = True,
        connection: ConnectionRefusals | None = None,
        cost: float = 1.0,
        within: float | None = None,
    ) -> None:
        """Wait for this refusal's turn (:meth:`refusal_delay`), then note on the client's
        ``connection`` record, if known, that it was refused now. A caller that cannot
        tell whether the client is retrying at once (no connection record) takes it as
        retrying, the safe side."""
        delay = self.refusal_delay(retrying, cost, within)
        if delay:
            await asyncio.sleep(delay)
        if connection is not None:
            connection.refused(asyncio.get_running_loop().time())

    def peer(self, name: str) -> ConnectionRefusals:
        """The refusal record of the connection a transport names ``name`` (gRPC's
        ``context.peer()``: one per client connection, whatever calls it carries; a
        channel's concurrent calls refused together count as retrying). Bounded: all
        are forgotten when :data:`MAX_PEERS` are known."""
        record = self._peers.get(name)
        if record is None:
            if len(self._peers) >= MAX_PEERS:
                self._peers.clear()
            record = self._peers[name] = self.connection()
        return record

    def connection(self, host: str | None = None) -> ConnectionRefusals:
        """A new connection's refusal record (the HTTP protocol makes one per connection),
        from the client ``host`` (its peer address) if known."""
        return ConnectionRefusals(self._retry_at_once, host, self._hosts)

    def _host_waits(self) -> bool:
        """Whether a refusal judged by its host (:class:`HostRefusals`) waits for the
        pace now: only while the pace's wait is under :data:`HOST_WAIT_SECONDS`."""
        return bool(self._rate) and (1 - self._refilled()) / self._rate < HOST_WAIT_SECONDS


class ConnectionRefusals:
    """Whether a client connection is retrying a refusal at once: its previous request
    was refused and this one came within ``window`` seconds of that answer; or, for a
    connection's first request, a request from the same client ``host`` was refused
    that recently. A client that opens a new connection for each request (urllib,
    ``requests`` without a session, ``ab`` and ``hey`` without keep-alive, a proxy
    without upstream keep-alive) comes back at once on a new connection, which no record
    of its own would tell from a polite client: at twice the load one worker served
    (wrk, ``Connection: close``, 32 connections) its refusals went unpaced, ~3,600 a
    second, and of ~1,080 requests a second it served ~210. The price: while a host is
    refused, a new connection's first request from it waits for the pace too, however
    its client retries (a client that keeps its connection is judged on its own).
    Only such refusals wait for the worker's pace (:meth:`ConcurrencyLimit.refusal_delay`):
    a client that waits at all before retrying, or one refused after an answered
    request, gets its 503 at once, and the clients that spin queue behind one another
    (their retries are what would take the CPU). One per connection (the HTTP protocol,
    service.api.http_protocol; gRPC's by peer, :meth:`ConcurrencyLimit.peer`); its
    clock is the event loop's."""

    __slots__ = ("_host", "_hosts", "_refused_at", "_window")

    def __init__(
        self,
        window: float = RETRY_AT_ONCE_SECONDS,
        host: str | None = None,
        hosts: HostRefusals | None = None,
    ) -> None:
        self._refused_at: float | None = None
        self._window = window
        self._host = host
        self._hosts = hosts

    def retrying(self, now: float, first: bool = False) -> bool | None:
        """Whether a request arriving ``now`` is a refused client's retry at once;
        ``first``: the connection's first request, judged by its host's refusals (None:
        such a retry, which waiting would not slow: :class:`HostRefusals`)."""
        if self._refused_at is not None:
            return now - self._refused_at < self._window
        if not first or self._hosts is None or self._host is None:
            return False
        return self._hosts.retrying(self._host, now)

    @property
    def after_refusal(self) -> bool:
        """Whether the connection's last request was refused (its next may be a retry)."""
        return self._refused_at is not None

    def refused(self, now: float) -> None:
        """The refusal's answer was sent at ``now``."""
        self._refused_at = now
        if self._hosts is not None and self._host is not None:
            self._hosts.refused(self._host, now)

    def passed(self) -> None:
        """A request on the connection was admitted (a probe, which is not limited, does
        not count: it says nothing of how the client retries)."""
        self._refused_at = None


class HostRefusals:
    """When each client host was last refused (by any of the replica's workers with a
    shared table, service.shared_hosts; else this worker's, bounded), for judging a new
    connection's first request (:meth:`ConnectionRefusals.retrying`): a retry at once
    when its host was refused within ``window``, and only while ``waits()`` says such
    a refusal still waits for the pace. A client that reconnects for each request and
    waits for its answer sends nothing while its 503 waits, so the pace slows it; one
    that opens connections at its own rate, whatever the answers (open loop), is not
    slowed, and its refusals would only pile up: at twice what 2 workers serve (3,000
    new connections a second, each one request) 503s waited the full 2 s and held
    connections were refused over CNNSERVE_MAX_CONNECTIONS. Past
    :data:`HOST_WAIT_SECONDS` of wait, they are answered at once, taking no turn: owed,
    their turns kept the wait past the bound for as long as they came (the closed
    loop's too, which then went unpaced)."""

    __slots__ = ("_at", "_shared", "_waits", "_window")

    def __init__(
        self, window: float, waits: Callable[[], bool], shared: SharedHosts | None = None
    ) -> None:
        self._at: dict[str, float] = {}
        self._window = window
        self._waits = waits
        # With several workers, the replica's table (service.shared_hosts): a client's
        # reconnect most often lands on another worker than the one that refused it.
        self._shared = shared

    def retrying(self, host: str, now: float) -> bool | None:
        """True: ``host`` was refused within the window, and its refusal waits its turn;
        None: refused within the window, but the wait is past the bound; else False."""
        at = self._at.get(host) if self._shared is None else self._shared.refused_at(host)
        if at is None or now - at >= self._window:
            return False
        return True if self._waits() else None

    def refused(self, host: str, now: float) -> None:
        if self._shared is not None:
            self._shared.refused(host, now)
            return
        if len(self._at) >= MAX_PEERS and host not in self._at:
            self._at.clear()  # bounded: forgotten, as gRPC's peers are
        self._at[host] = now


def grpc_refusal_cost(message_bytes: int) -> float:
    """The tokens of the refusal pace a refused gRPC call takes: the call, and the bytes
    of its request message (:data:`GRPC_REFUSAL_COST`, :data:`GRPC_REFUSAL_BYTES`)."""
    return GRPC_REFUSAL_COST + message_bytes / GRPC_REFUSAL_BYTES


def _alone_average(average: float, sample: float) -> float:
    """A moving average (:data:`ALONE_WEIGHT`) of windows of requests alone; 0 = none yet."""
    return average + ALONE_WEIGHT * (sample - average) if average else sample


def next_limit(
    limit: int, *, held: int, full: bool, p99: float, target: float, floor: int, cap: int
) -> int:
    """The limit after a window, in proportion to target / p99 of its answers: cut when
    over the target (from what the window held, if that was less than the limit; by at
    most a fifth), raised when within it and the limit was full (by one at least, a
    quarter at most), else kept; between ``floor`` and ``cap`` (a limit below a floor that
    rose, as requests of many images gave way to single ones, goes up to it at once)."""
    if p99 > target:
        limit = int(min(limit, held) * max(MAX_CUT, target / p99))
    elif full:
        limit = max(limit + 1, int(limit * min(MAX_RAISE, target / p99)))
    return min(cap, max(floor, limit))


def worker_limit(
    settings: Settings, clock: Callable[[], float] = time.monotonic
) -> ConcurrencyLimit:
    """The limit a serving worker shares between REST and gRPC; not published to its
    siblings until the worker says it serves (:meth:`ConcurrencyLimit.set_serving`)."""
    return ConcurrencyLimit(
        settings.max_concurrent_requests,
        budget=settings.queue_wait_budget_seconds,
        floor=max(1, settings.max_batch_size // 2),
        refusals_per_second=settings.max_refusals_per_second,
        retry_at_once=settings.retry_at_once_seconds,
        clock=clock,
        siblings=Siblings.from_environment(settings.workers),
        shared_hosts=SharedHosts.from_environment(settings.workers),
        serving=False,
    )
