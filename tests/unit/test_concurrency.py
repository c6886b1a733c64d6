"""The worker's concurrency limit (REST and gRPC share one): a fixed cap, the adaptation
to the latency budget on a moved clock, and the pacing of refusals."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from service import concurrency as module
from service.concurrency import (
    BUDGET_SHARE,
    GRPC_REFUSAL_BYTES,
    GRPC_REFUSAL_COST,
    INITIAL_FLOORS,
    MAX_REFUSAL_WAIT_SECONDS,
    REFUSAL_BODY_BYTES,
    RETRY_AT_ONCE_SECONDS,
    ConcurrencyLimit,
    ConnectionRefusals,
    grpc_refusal_cost,
    next_limit,
    worker_limit,
)
from service.config import Settings
from service.errors import Overloaded


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_limit_admits_up_to_its_cap_and_frees_places() -> None:
    limit = ConcurrencyLimit(3)
    taken = [limit.try_acquire() for _ in range(4)]
    assert [t is not None for t in taken] == [True, True, True, False]
    refusal = limit.refusal()
    assert isinstance(refusal, Overloaded) and refusal.reason == "concurrency"
    assert refusal.retry_after and "3 requests" in refusal.message
    assert "CNNSERVE_MAX_CONCURRENT_REQUESTS" in refusal.message
    first = taken[0]
    assert first is not None
    limit.release(first)
    assert limit.try_acquire() is not None and limit.try_acquire() is None
    with pytest.raises(ValueError):
        ConcurrencyLimit(0)


def test_a_window_over_the_target_cuts_the_limit_in_proportion() -> None:
    common = {"full": True, "target": 0.05, "floor": 8, "cap": 512}
    # From what the window held when that was below the limit, not from the cap.
    assert next_limit(512, held=64, p99=0.06, **common) == int(64 * 0.05 / 0.06)
    assert next_limit(53, held=64, p99=0.5, **common) == int(53 * 0.8)  # a fifth at most
    assert next_limit(9, held=64, p99=0.5, **common) == 8  # never below the floor


def test_a_window_within_the_target_raises_a_full_limit_only() -> None:
    common = {"held": 80, "p99": 0.01, "target": 0.05, "floor": 8, "cap": 100}
    assert next_limit(80, full=False, **common) == 80
    assert next_limit(80, full=True, **common) == 100  # a quarter at most
    assert next_limit(10, full=True, **{**common, "p99": 0.049}) == 11  # at least one
    assert next_limit(40, full=True, **{**common, "p99": 0.045}) == 44  # in proportion
    assert next_limit(99, full=True, **common) == 100  # never above the cap


def rounds(
    limit: ConcurrencyLimit, clock: Clock, held: int, seconds: float, n: int, images: int = 1
) -> None:
    """``n`` rounds of ``held`` requests at once (of ``images`` each), each answered after
    ``seconds``."""
    for _ in range(n):
        taken = [limit.try_acquire() for _ in range(held)]
        clock.now += seconds
        for t in taken:
            if t is not None:
                limit.release(t, images)


def test_the_limit_follows_the_latency_of_answers() -> None:
    clock = Clock()
    limit = ConcurrencyLimit(512, budget=0.05, floor=8, clock=clock)
    assert limit.limit == INITIAL_FLOORS * 8  # it starts low, not at the cap
    rounds(limit, clock, held=64, seconds=0.9 * BUDGET_SHARE * 0.05, n=100)
    assert limit.limit >= 64  # full, within the worker's share of the budget: raised
    rounds(limit, clock, held=64, seconds=0.2, n=10)
    assert 8 <= limit.limit < 64  # answers slower than the budget: fewer admitted
    rounds(limit, clock, held=600, seconds=1.0, n=30)
    assert limit.limit == 8  # never below the floor
    rounds(limit, clock, held=600, seconds=0.01, n=300)
    assert limit.limit == 512  # fast answers and refusals: back to the cap


def test_the_floor_is_in_images_so_requests_of_many_go_below_it() -> None:
    """Half a batch of images in flight is the floor: 16 requests of 16 images held 8
    batches whatever their answers took. Requests of one image keep the floor they had."""
    clock = Clock()
    limit = ConcurrencyLimit(512, budget=0.05, floor=16, clock=clock)
    rounds(limit, clock, held=1, seconds=0.01, n=40, images=16)  # alone: 10 ms
    rounds(limit, clock, held=64, seconds=1.0, n=40, images=16)
    assert limit.limit == 1  # 16 images: one request is half a batch
    rounds(limit, clock, held=64, seconds=1.0, n=40, images=4)
    assert limit.limit == 4
    rounds(limit, clock, held=64, seconds=1.0, n=40, images=1)
    assert limit.limit == 16
    rounds(limit, clock, held=64, seconds=1.0, n=40, images=16)
    assert limit.limit == 1
    # Single images again, answered fast: up to their floor at the first window of them
    # (the one before still holds slow answers of 16 images), not by one a window.
    rounds(limit, clock, held=64, seconds=0.005, n=33)
    assert limit.limit >= 16


def test_the_floor_in_images_waits_for_what_a_request_alone_takes() -> None:
    """Never seen alone (a worker never idle), a request of many images keeps the floor
    in requests: its target would leave out what it takes alone, and refuse at the load
    the worker serves at full speed."""
    clock = Clock()
    limit = ConcurrencyLimit(512, budget=0.05, floor=16, clock=clock)
    rounds(limit, clock, held=64, seconds=1.0, n=40, images=16)
    assert limit.limit == 16


def test_what_a_request_of_many_images_takes_alone_is_scaled_from_smaller_ones() -> None:
    """Learnt from single images, what a request alone takes is scaled up by the images
    a window's requests carry: 8 images answered in 60 ms are within a 50 ms budget's
    share (30 ms) plus 8 x 5 ms, and the full limit rises."""
    clock = Clock()
    limit = ConcurrencyLimit(512, budget=0.05, floor=16, clock=clock)
    rounds(limit, clock, held=1, seconds=0.005, n=40)  # alone: 5 ms, one image
    start = limit.limit
    rounds(limit, clock, held=start + 8, seconds=0.06, n=40, images=8)
    assert limit.limit > start
    rounds(limit, clock, held=64, seconds=0.2, n=40, images=8)
    assert limit.limit < start


def test_a_limit_cut_to_one_rises_when_answers_are_fast() -> None:
    """A window holding one request at a time is read as what a request alone takes,
    unless the limit was full at one: then it rises as any full limit does."""
    clock = Clock()
    limit = ConcurrencyLimit(512, budget=0.05, floor=1, clock=clock)
    rounds(limit, clock, held=64, seconds=1.0, n=40)
    assert limit.limit == 1
    rounds(limit, clock, held=64, seconds=0.005, n=100)
    assert limit.limit > 4


def test_refusals_decided_before_acquiring_count_as_a_full_limit() -> None:
    """A request refused before try_acquire (the HTTP protocol's early refusal asks
    admits()) marks the window full, so fast answers raise a cut limit again."""
    clock = Clock()
    limit = ConcurrencyLimit(512, budget=0.05, floor=8, clock=clock)
    rounds(limit, clock, held=64, seconds=0.5, n=10)
    cut = limit.limit
    assert cut < 64
    for _ in range(30):  # fill the limit, the next one refused early; answers are fast
        taken = []
        while limit.admits():
            t = limit.try_acquire()
            assert t is not None
            taken.append(t)
        clock.now += 0.01
        for t in taken:
            limit.release(t)
    assert limit.limit > cut


def test_a_worker_is_shedding_for_a_retry_after_once_it_refuses() -> None:
    """shedding() (what keeps batches off the event loop) holds from a refusal for
    SHEDDING_SECONDS, a refusal asked through admits() alone included, and ends when
    the worker has refused nothing that long."""
    clock = Clock()
    limit = ConcurrencyLimit(1, clock=clock)
    assert not limit.shedding()
    taken = limit.try_acquire()
    assert taken is not None and not limit.shedding()  # admitted: not shedding
    assert not limit.admits() and limit.shedding()
    limit.release(taken)
    clock.now += module.SHEDDING_SECONDS * 0.9
    assert limit.shedding()
    clock.now += module.SHEDDING_SECONDS * 0.2
    assert not limit.shedding()


def test_the_event_loops_lag_is_a_moving_average_of_how_late_its_timer_fires() -> None:
    """lag (cnnserve_event_loop_lag_seconds: what a request arriving now waits before its
    handler starts) moves a fifth of the way to each sample, and the gauge shows it. On a
    moved clock: each 10 ms timer is read as 20 ms late, then as on time."""
    clock = Clock()
    step = [0.03]

    def moving() -> float:
        clock.now += step[0]
        return clock.now

    limit = ConcurrencyLimit(1, clock=moving)

    async def samples(n: int) -> None:
        watching = asyncio.create_task(limit.watch_event_loop())
        try:
            while limit._lag_samples < n:
                await asyncio.sleep(0.005)
        finally:
            watching.cancel()

    asyncio.run(samples(5))
    late = limit._lag_samples
    assert limit.lag == pytest.approx(0.02 * (1 - (1 - module.LAG_WEIGHT) ** late))
    assert REGISTRY.get_sample_value("cnnserve_event_loop_lag_seconds") == limit.lag
    held, step[0] = limit.lag, module.LAG_INTERVAL
    asyncio.run(samples(late + 5))
    on_time = limit._lag_samples - late
    assert limit.lag == pytest.approx(held * (1 - module.LAG_WEIGHT) ** on_time)


def test_what_a_request_alone_takes_is_added_to_the_budget() -> None:
    """Requests that are slow on their own (a large image, a long list) are not
    queueing: the limit is cut only by what goes beyond that."""
    clock = Clock()
    limit = ConcurrencyLimit(100, budget=0.05, floor=8, clock=clock)
    rounds(limit, clock, held=1, seconds=0.2, n=40)  # alone: 200 ms each
    rounds(limit, clock, held=40, seconds=0.2 + 0.9 * BUDGET_SHARE * 0.05, n=5)
    assert limit.limit > INITIAL_FLOORS * 8  # within the target: raised, not cut
    rounds(limit, clock, held=40, seconds=0.5, n=5)
    assert limit.limit < 40


def test_without_a_budget_the_limit_is_the_fixed_cap() -> None:
    clock = Clock()
    limit = ConcurrencyLimit(10, clock=clock)
    rounds(limit, clock, held=20, seconds=5.0, n=10)
    assert limit.limit == 10


def test_a_worker_limit_follows_the_settings() -> None:
    settings = Settings(
        max_concurrent_requests=256,
        queue_wait_budget_seconds=0.02,
        max_batch_size=16,
        max_refusals_per_second=500,
    )
    clock = Clock()
    limit = worker_limit(settings, clock)
    assert (limit.cap, limit.limit) == (256, 16)  # starting at twice its floor
    rounds(limit, clock, held=300, seconds=1.0, n=40)
    assert limit.limit == 8  # the floor is half a batch


def test_refusals_beyond_a_burst_wait_their_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(module.asyncio, "sleep", sleep)
    limit = ConcurrencyLimit(1, refusals_per_second=100, clock=clock)  # a burst of 5

    async def refuse(times: int) -> None:
        for _ in range(times):
            await limit.pace_refusal()

    asyncio.run(refuse(7))  # at one instant: the burst at once, then one every 10 ms
    assert waits == pytest.approx([0.01, 0.02])
    clock.now += 1.0  # the bucket has refilled: answered at once again
    asyncio.run(refuse(5))
    assert len(waits) == 2
    clock.now += 0.02  # two tokens accrued, the third is owed
    asyncio.run(refuse(3))
    assert waits[2:] == pytest.approx([0.01])
    unpaced = ConcurrencyLimit(1, clock=clock)
    asyncio.run(unpaced.pace_refusal())
    assert len(waits) == 3

    async def refused_on_connection() -> bool | None:
        # A minute's retry window: a loaded host's pause cannot make it miss.
        roomy = ConcurrencyLimit(1, clock=clock, retry_at_once=60.0)
        connection = roomy.connection()
        await roomy.pace_refusal(False, connection)  # the answer goes out: noted
        return connection.retrying(asyncio.get_running_loop().time())

    assert asyncio.run(refused_on_connection()) is True


def test_only_clients_retrying_at_once_wait_for_the_pace() -> None:
    clock = Clock()
    limit = ConcurrencyLimit(1, refusals_per_second=100, clock=clock)  # a burst of 5
    assert [limit.refusal_delay() for _ in range(5)] == [0.0] * 5  # the burst is spent
    # A client not retrying at once is answered now, its token owed...
    assert [limit.refusal_delay(retrying=False) for _ in range(50)] == [0.0] * 50
    # ...by the spinning clients: the next of them waits for 51 tokens.
    assert limit.refusal_delay() == pytest.approx(0.51)
    # What the ones not waiting may owe is a second's worth: a spinner waits no longer.
    assert [limit.refusal_delay(retrying=False) for _ in range(500)] == [0.0] * 500
    assert limit.refusal_delay() == pytest.approx(1.01)
    clock.now += 10.0  # refilled: the burst again
    assert [limit.refusal_delay(retrying=False) for _ in range(5)] == [0.0] * 5
    assert limit.refusal_delay() == pytest.approx(0.01)


def test_a_refused_body_costs_the_pace_its_bytes_as_they_come() -> None:
    """A 580 KB body cost a refusal at the headers 0.2-0.29 ms of CPU against 0.06-0.09
    ms for 18 KB: paced by count alone, spinning clients of big bodies took four times
    the CPU the pace allows small ones."""
    clock = Clock()
    limit = ConcurrencyLimit(1, refusals_per_second=100, clock=clock)  # a burst of 5
    assert [limit.refusal_delay() for _ in range(5)] == [0.0] * 5  # the burst is spent
    # Three bodies' worth of bytes came: three tokens owed, so the next refusal waits 40 ms.
    limit.charge_body(REFUSAL_BODY_BYTES)
    limit.charge_body(2 * REFUSAL_BODY_BYTES)
    assert limit.refusal_delay() == pytest.approx(0.04)
    limit.charge_body(0)  # nothing came: nothing owed
    assert limit.refusal_delay() == pytest.approx(0.05)
    # Owed as a refusal answered at once owes its token: a second's worth at most.
    limit.charge_body(10**12)
    assert limit.refusal_delay() == pytest.approx(1.01)
    clock.now += 10.0  # refilled: the burst again
    assert limit.refusal_delay() == 0.0
    unpaced = ConcurrencyLimit(1, clock=clock)
    unpaced.charge_body(10**9)
    assert unpaced.refusal_delay() == 0.0


def test_a_refusal_takes_the_tokens_of_what_it_costs() -> None:
    """A gRPC refusal costs the event loop several HTTP refusals (grpc.aio's handler
    and call end): counted as one, gRPC clients retrying at once took a quarter of a
    core at the pace, and goodput at 4x their load was 52-71% of capacity."""
    clock = Clock()
    limit = ConcurrencyLimit(1, refusals_per_second=100, clock=clock)  # a burst of 5
    assert limit.refusal_delay(cost=GRPC_REFUSAL_COST) == 0.0  # within the burst
    assert limit.refusal_delay(cost=GRPC_REFUSAL_COST) == pytest.approx(
        (2 * GRPC_REFUSAL_COST - 5) / 100
    )
    # Its message's bytes cost it more, as a refused HTTP body's do.
    assert grpc_refusal_cost(0) == GRPC_REFUSAL_COST
    assert grpc_refusal_cost(2 * GRPC_REFUSAL_BYTES) == GRPC_REFUSAL_COST + 2
    # One not retrying at once owes its cost: the spinners' turns pay for it.
    before = limit.refusal_delay(cost=0.0)
    assert limit.refusal_delay(retrying=False, cost=GRPC_REFUSAL_COST) == 0.0
    assert limit.refusal_delay(cost=0.0) == pytest.approx(before + GRPC_REFUSAL_COST / 100)


def test_a_refusal_waits_no_longer_than_its_clients_deadline_leaves() -> None:
    clock = Clock()
    limit = ConcurrencyLimit(1, refusals_per_second=10, retry_at_once=0.01, clock=clock)
    assert limit.refusal_delay() == 0.0  # the burst: one
    assert limit.refusal_delay(within=0.05) == pytest.approx(0.9 * 0.05)  # not 0.1
    # Never sooner than a retry counts as at once: a deadline of a millisecond must not
    # let a client spin unpaced, faster than one that waits between requests.
    assert limit.refusal_delay(within=0.001) == pytest.approx(0.01)
    assert limit.refusal_delay(within=-1.0) == pytest.approx(0.01)  # passed already
    # Each took its turn all the same: the next waits behind all.
    assert limit.refusal_delay(within=None) == pytest.approx(0.4)


def test_no_refusal_waits_longer_than_the_cap() -> None:
    """Spinning clients that give up on their held 503 and come back leave their turns
    in the queue: without a cap each newcomer waited behind all of them (100 s seen)."""
    clock = Clock()
    limit = ConcurrencyLimit(1, refusals_per_second=100, clock=clock)
    delays = [limit.refusal_delay() for _ in range(10_000)]
    assert max(delays) == pytest.approx(MAX_REFUSAL_WAIT_SECONDS)
    assert delays[104] == pytest.approx(1.0)  # the pace: 100 a second after the burst
    assert delays == sorted(delays) and delays[-1] == delays[1000]  # then flat at the cap
    clock.now += MAX_REFUSAL_WAIT_SECONDS + 0.05  # the queue drained: the burst again
    assert limit.refusal_delay() == 0.0


def test_a_connection_is_retrying_at_once_only_right_after_a_refusal() -> None:
    connection = ConnectionRefusals()
    assert not connection.retrying(0.0)  # a new connection
    connection.refused(1.0)
    assert connection.retrying(1.0 + RETRY_AT_ONCE_SECONDS / 2)
    assert not connection.retrying(1.0 + RETRY_AT_ONCE_SECONDS)  # it waited
    connection.passed()  # its next request went on: the refusal is forgotten
    assert not connection.retrying(1.0)


def test_an_admitted_request_clears_its_connections_refusal() -> None:
    limit = ConcurrencyLimit(1)
    connection = limit.connection()
    connection.refused(10.0)
    taken = limit.admit(connection)
    assert taken is not None and not connection.retrying(10.0)
    connection.refused(11.0)
    assert limit.admit(connection) is None and connection.retrying(11.0)  # still refused
    limit.release(taken)
    assert limit.admit(None) is not None  # a caller without a connection record


def test_a_new_connections_first_request_is_judged_by_its_hosts_refusals() -> None:
    # A client opening a connection per request comes back on a new one: its first
    # request counts as a retry at once when its host was refused that recently.
    limit = ConcurrencyLimit(1, refusals_per_second=100.0, clock=Clock())
    limit.connection("10.0.0.1").refused(1.0)
    again = limit.connection("10.0.0.1")
    assert again.retrying(1.0 + RETRY_AT_ONCE_SECONDS / 2, first=True)
    assert not again.retrying(1.0 + RETRY_AT_ONCE_SECONDS, first=True)  # it waited
    # The connection's later requests are its own (a probe answered first, say).
    assert not again.retrying(1.0 + RETRY_AT_ONCE_SECONDS / 2)
    # Another host, or a connection whose host is not known, is not.
    assert not limit.connection("10.0.0.2").retrying(1.001, first=True)
    assert not limit.connection().retrying(1.001, first=True)
    # Admitted, a new connection of that host does not clear the host's refusal: its
    # other connections may still be refused.
    limit.connection("10.0.0.1").passed()
    assert limit.connection("10.0.0.1").retrying(1.001, first=True)


def test_a_hosts_new_connections_wait_only_while_the_pace_is_short() -> None:
    # An open loop of new connections is not slowed by waits: once the pace's wait
    # passes HOST_WAIT_SECONDS, a refusal judged by its host is answered at once; a
    # connection's own retry still waits.
    clock = Clock()
    limit = ConcurrencyLimit(1, refusals_per_second=100.0, clock=clock)
    connection = limit.connection("10.0.0.1")
    connection.refused(1.0)
    while limit.refusal_delay() < module.HOST_WAIT_SECONDS:
        pass
    assert limit.connection("10.0.0.1").retrying(1.001, first=True) is None
    assert connection.retrying(1.001) is True
    # Answered at once, it takes no turn: owed, turns would keep the wait past the bound
    # as long as such refusals came, the spinning clients' included.
    before = limit.refusal_delay()
    assert limit.refusal_delay(None) == 0.0
    assert limit.refusal_delay() == pytest.approx(before + 1 / 100.0)
    clock.now += 1.0  # the turns went by
    assert limit.connection("10.0.0.1").retrying(1.001, first=True) is True


def test_hosts_are_forgotten_in_bulk() -> None:
    limit = ConcurrencyLimit(1)
    limit.connection("10.0.0.1").refused(1.0)
    for n in range(module.MAX_PEERS):  # clients' addresses: the table stays bounded
        limit.connection(f"10.1.{n // 256}.{n % 256}").refused(1.0)
    assert not limit.connection("10.0.0.1").retrying(1.0, first=True)


def test_grpc_peers_are_remembered_by_name_and_forgotten_in_bulk() -> None:
    limit = ConcurrencyLimit(1)
    first = limit.peer("ipv4:127.0.0.1:5000")
    first.refused(1.0)
    assert limit.peer("ipv4:127.0.0.1:5000") is first
    for port in range(module.MAX_PEERS):  # clients' names: the table stays bounded
        limit.peer(f"ipv4:127.0.0.1:{6000 + port}")
    assert not limit.peer("ipv4:127.0.0.1:5000").retrying(1.0)  # forgotten: a new record


def test_how_soon_a_retry_counts_as_at_once_is_a_setting() -> None:
    limit = worker_limit(Settings(retry_at_once_seconds=0.5), Clock())
    for connection in (limit.connection(), limit.peer("ipv4:127.0.0.1:5000")):
        connection.refused(1.0)
        assert connection.retrying(1.4) and not connection.retrying(1.5)


def test_calls_waiting_in_grpcs_core_count_as_held_and_their_wait_as_answer_time() -> None:
    """Calls gRPC's core holds untaken (service.api.grpc_backlog) take places as those in
    flight do, each one taken frees one, and their wait is added to the window's p99:
    with answers of 5 ms but calls waiting 0.1 s the limit falls."""
    clock = Clock()
    limit = ConcurrencyLimit(512, budget=0.05, floor=8, clock=clock)
    rounds(limit, clock, held=64, seconds=0.005, n=400)
    assert limit.limit >= 64
    raised = limit.limit
    limit.note_waiting(raised - 1, 0.0)
    assert limit.try_acquire() is not None  # one place left beside the waiting
    assert limit.try_acquire() is None
    assert "gRPC calls wait to be taken" in str(limit.refusal())
    limit.took_waiting()
    assert limit.waiting == raised - 2
    limit.note_waiting(0, 0.0)
    clock.now += 1
    for _ in range(20):
        limit.note_waiting(40, 0.1)
        rounds(limit, clock, held=8, seconds=0.005, n=1)
    rounds(limit, clock, held=8, seconds=0.005, n=3)
    assert limit.limit < raised  # answers fast, but what waited before them was not
    limit.note_waiting(0, 0.0)
    assert limit.waiting == 0
