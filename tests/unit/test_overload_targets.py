"""`cnnserve bench --overload`'s verdicts from measured numbers (service.bench.overload)."""

from __future__ import annotations

from typing import Any

from service.bench.overload import percentile, targets

UNLOADED = {"p50_ms": 3.0, "p99_ms": 5.0}


def level(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "connections": 128,
        "wrk": {"statuses": {"200": 900, "503": 300}, "errors": {"503": 300}},
        "clients_statuses": {"200": 40, "503": 10},
        "goodput_share": 0.9,
        "probe_200": {"p99_ms": 60.0},
        "probe_503_p50_ms": 2.0,
        "spinner_503_p50_ms": 20.0,
        "readiness": {"polls": 50, "not_ready": 0},
        "rss_mb": {"first": 300.0, "last": 305.0, "peak": 310.0},
        "recovery": {"statuses": [200, 503], "answers": 80, "ok": 79, "p50_ms": 4.0},
    }
    return base | changes


def verdicts(lv: dict[str, Any]) -> dict[str, bool | None]:
    return {t["target"]: t["met"] for t in targets(UNLOADED, [lv], budget_ms=80.0)}


def test_a_level_that_sheds_cleanly_meets_all_but_the_spinners_503s() -> None:
    met = verdicts(level())
    assert met.pop("503 p50 <= 10 ms (spinning client)") is False
    assert all(met.values()), met


def test_each_target_fails_on_its_own_number() -> None:
    socket_errors = {"statuses": {"200": 9}, "errors": {"timeout": 3}}
    assert not verdicts(level(wrk=socket_errors))["only 200s and 503s"]
    assert not verdicts(level(clients_statuses={"200": 1, "0": 2}))["only 200s and 503s"]
    assert not verdicts(level(goodput_share=0.69))["goodput >= 70% of capacity"]
    # 2 x 5 + 80 = 90 ms
    assert not verdicts(level(probe_200={"p99_ms": 91.0}))[
        "admitted p99 <= 2 x unloaded p99 + budget"
    ]
    assert not verdicts(level(readiness={"polls": 50, "not_ready": 1}))["readiness kept"]
    grown = {"first": 300.0, "last": 340.0, "peak": 340.0}
    assert not verdicts(level(rss_mb=grown))["resident memory flat"]
    slow = {"statuses": [200], "answers": 80, "ok": 80, "p50_ms": 6.5}
    assert not verdicts(level(recovery=slow))["full speed within 1 s of the load's end"]
    refused = {"statuses": [200, 503], "answers": 80, "ok": 75, "p50_ms": 4.0}
    assert not verdicts(level(recovery=refused))["full speed within 1 s of the load's end"]


def test_what_was_not_measured_is_neither_met_nor_missed() -> None:
    met = verdicts(level(probe_503_p50_ms=None, rss_mb={"first": None, "last": None}))
    assert met["503 p50 <= 10 ms (polite client)"] is None
    assert met["resident memory flat"] is None


def test_percentile_is_a_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0
    # The rank rounds up: the median of five is the third, their p90 the largest (a
    # rounding to even had read both one rank low).
    five = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(five, 50) == 3.0 and percentile(five, 90) == 5.0
    assert percentile([float(v) for v in range(1, 52)], 99) == 51.0
