"""`cnnserve bench`'s arithmetic, on canned numbers: wrk's JSON, the limit, the advisor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.bench import advisor
from service.bench.limits import cost_at, limit
from service.bench.sweep import Batching
from service.bench.wrk import summarize
from tests.helpers.server import ROOT

WRK_JSON = {
    "requests": 1010,
    "duration_us": 2_000_000,
    "bytes": 123,
    "errors": {"connect": 0, "read": 0, "write": 0, "status": 10, "timeout": 2},
    "statuses": {"200": 1000, "503": 10},
    "latency_us": {
        "mean": 5000.0,
        "max": 90000,
        "percentiles": {"50": 4000, "90": 8000, "99": 20000, "99.9": 80000},
    },
}


def test_wrk_json_becomes_milliseconds_and_errors_by_status() -> None:
    result = summarize(WRK_JSON, wrk_cpu_s=0.5, wall_s=2.0)
    assert result["requests_per_s"] == 500.0  # 2xx only
    assert (result["p50_ms"], result["p99_ms"], result["p99.9_ms"]) == (4.0, 20.0, 80.0)
    assert result["errors"] == {"503": 10, "timeout": 2}
    assert result["generator_cores"] == 0.25


def test_inference_cost_is_interpolated_between_measured_batches() -> None:
    costs = {1: 1.0, 2: 0.8, 4: 0.5}
    assert cost_at(costs, 0.5) == 1.0 and cost_at(costs, 9) == 0.5
    assert cost_at(costs, 3) == pytest.approx(0.65)
    got = limit(cores=2, http_s=0.001, decode_s=0.0005, infer_s=0.0005)
    assert got["limit_rps"] == 1000.0


def point(rps: float, p99: float, batch: int, errors: dict[str, int] | None = None) -> Any:
    return {
        "requests_per_s": rps,
        "p99_ms": p99,
        "ok": 1,
        "errors": errors or {},
        "workers": 2,
        "connections": 32,
        "served_batch": 3.5,
        "max_batch_size": batch,
        "batch_timeout_micros": 1000,
        "num_batch_threads": 2,
    }


def test_advisor_picks_the_fastest_point_within_the_slo() -> None:
    runs = [
        {"points": [point(900, 40, 8), point(1500, 150, 32)]},
        {"points": [point(1200, 90, 16), point(2000, 80, 64, {"503": 3})]},
    ]
    advice = advisor.recommend(runs, slo_p99_ms=100)
    assert advice["meets_slo"] and advice["max_batch_size"] == 16
    assert advice["batching_config"] == (
        "max_batch_size { value: 16 }\n"
        "batch_timeout_micros { value: 1000 }\n"
        "num_batch_threads { value: 2 }\n"
    )
    assert "CNNSERVE_WORKERS=2" in advisor.describe(advice)
    missed = advisor.recommend(runs, slo_p99_ms=10)
    assert not missed["meets_slo"] and missed["max_batch_size"] == 8  # lowest p99


def test_batching_parse_and_environment() -> None:
    b = Batching.parse("32:1000:2")
    assert b.env() == {
        "CNNSERVE_MAX_BATCH_SIZE": "32",
        "CNNSERVE_BATCH_TIMEOUT_MICROS": "1000",
        "CNNSERVE_NUM_BATCH_THREADS": "2",
    }
    with pytest.raises(ValueError, match="max_batch:timeout_us:threads"):
        Batching.parse("32:1000")
    for out_of_range in ("0:1000:1", "32:1000:0", "32:-1:1"):
        with pytest.raises(ValueError, match="at least"):
            Batching.parse(out_of_range)


def test_decode_alone_is_the_fastest_of_fresh_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each measurement is a real decode in its own process; the limit takes the
    fastest, and a process that fails says why instead of giving a number."""
    from service.bench import limits
    from service.config import Settings
    from tests.helpers.images import encode, gradient

    version = ROOT / "model_repository" / "fashion_mnist" / "1"
    images = [encode(gradient(224, 224), "JPEG"), encode(gradient(300, 200), "PNG")]
    seen: list[float] = []
    measure = limits._decode_in_process

    def recorded(*args: Any) -> float:
        seen.append(measure(*args))
        return seen[-1]

    monkeypatch.setattr(limits, "_decode_in_process", recorded)
    cost = limits.decode_cost(images, version, Settings(), seconds=0.3)
    assert len(seen) == limits.DECODE_PROCESSES
    assert cost == min(seen) and 0 < cost < 0.5

    with pytest.raises(RuntimeError, match="decode measurement failed"):
        measure(tmp_path / "missing", version, 10**6, 0.1, 0)
