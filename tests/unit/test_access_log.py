"""The access log: one JSON line per finished request, written by a log thread."""

from __future__ import annotations

import json
import threading

import pytest

from service.requestlog import (
    RequestRecord,
    _line,
    _time_text,
    client_request_id,
    configure_access_log,
    finish,
    new_request_id,
)


def test_lines_are_written_off_the_request_thread_in_order_and_flushed_at_stop(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stop = configure_access_log(True)
    try:
        ids = [new_request_id() for _ in range(50)]
        for i, rid in enumerate(ids):
            record = RequestRecord(rid, "rest", "POST", route="/v1/classify")
            record.model, record.version = "m", "3"
            record.timings["decode"] = 0.0012
            finish(record, 200 if i % 2 else 503)
    finally:
        stop()  # writes what is still queued
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["request_id"] for line in lines] == ids
    assert lines[0]["status"] == 503 and lines[1]["status"] == 200
    assert lines[0]["model"] == "m" and lines[0]["version"] == 3
    assert lines[0]["timings_ms"] == {"decode": 1.2}
    assert not [t for t in threading.enumerate() if t.name == "access-log"]


def test_disabled_access_log_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    stop = configure_access_log(False)
    finish(RequestRecord(new_request_id(), "grpc", "POST"), 200)
    stop()
    assert capsys.readouterr().out == ""


def test_request_ids_are_unique_and_uuid_sized() -> None:
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_a_client_request_id_is_kept_only_as_visible_ascii() -> None:
    # It is echoed and logged as it came: no spaces, control or non-ASCII bytes.
    assert client_request_id(b"trace-abc_1.2:3/x") == "trace-abc_1.2:3/x"
    assert client_request_id(b"a" * 300) == "a" * 128
    for sent in (b"", b"caf\xc3\xa9", b"a b", b"x\r\ny", b"\x00"):
        fresh = client_request_id(sent)
        assert len(fresh) == 32 and int(fresh, 16) >= 0, sent


def test_each_line_has_the_time_of_its_own_second() -> None:
    """The time's text is made once a second (thousands of lines a second under an open
    loop), never carried into the next second."""
    import time

    from service.requestlog import _line

    record = RequestRecord("r", "rest", "GET", route="/readyz")
    for at in (1_800_000_000.2, 1_800_000_000.9, 1_800_000_001.0, 1_799_999_999.5, 1.5):
        line = json.loads(_line(at, record, 200, 0.001))
        assert line["time"] == time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(at))
        assert (line["request_id"], line["status"], line["duration_ms"]) == ("r", 200, 1.0)


@pytest.mark.parametrize(
    ("request_id", "method", "route", "model", "version", "code", "timings", "seconds"),
    [
        ("e943a87544e2834d9cea000000002ecb", "POST", "/v1/classify", "", "", 503, {}, 0.000316),
        (
            'a"quote\\back/slash',
            "GET",
            "/v1/models/{model}",
            "m",
            "3",
            200,
            {"decode": 0.0012},
            2.5,
        ),
        ("id", "POST", "Predict", "caf\u00e9 \u2603", "12", "RESOURCE_EXHAUSTED", {}, 0.0),
        ("x", "HEAD", "(unmatched)", "m\n\t", "0", 404, {"infer": 1e-7, "encode": 12.0}, 1e-9),
    ],
)
def test_a_line_is_the_json_the_record_says(
    request_id: str,
    method: str,
    route: str,
    model: str,
    version: str,
    code: int | str,
    timings: dict[str, float],
    seconds: float,
) -> None:
    # The line is written from a template (the log thread's CPU is the event loop's
    # under an open loop): the very text json.dumps writes for the same fields.
    record = RequestRecord(request_id, "grpc", method, route=route, model=model, version=version)
    record.timings.update(timings)
    at = 1_765_000_000.25
    expected = {
        "time": _time_text(at),
        "request_id": request_id,
        "protocol": "grpc",
        "method": method,
        "route": route,
        "status": code,
        "model": model or None,
        "version": int(version) if version else None,
        "duration_ms": round(seconds * 1e3, 3),
        "timings_ms": {k: round(v * 1e3, 3) for k, v in timings.items()},
    }
    line = _line(at, record, code, seconds)
    assert line == json.dumps(expected, separators=(",", ":"))
    assert json.loads(line) == expected


def test_overload_refusals_past_the_budget_are_counted_in_a_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Past its budget a second, an overload refusal is not a line of its own: the log
    thread says how many there were, per protocol, route and status. Other answers, and
    a 503 that is no overload refusal, are all logged."""
    stop = configure_access_log(True, 3)
    try:
        for route in ("/v1/classify", "/v1/classify", "/v1/models/{model}:predict"):
            for _ in range(10):
                finish(
                    RequestRecord(new_request_id(), "rest", "POST", route=route), 503, refusal=True
                )
        for _ in range(5):
            finish(
                RequestRecord(new_request_id(), "grpc", "POST", route="Predict"), 503, refusal=True
            )
            finish(RequestRecord(new_request_id(), "rest", "POST", route="/v1/classify"), 503)
            finish(RequestRecord(new_request_id(), "rest", "POST", route="/v1/classify"), 200)
    finally:
        stop()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    refused = [line for line in lines if "not_logged" not in line]
    counted = {
        (c["protocol"], c["route"], c["status"]): c["not_logged"]
        for c in lines
        if "not_logged" in c
    }
    # 3 a second at most (the loop may have crossed into the next second: 6 then).
    assert len(refused) - 10 in range(3, 7)
    assert all("CNNSERVE_ACCESS_LOG_REFUSALS_PER_SECOND" in c["why"] for c in lines if "why" in c)
    assert sum(counted.values()) + len(refused) - 10 == 35
    assert set(counted) <= {
        ("rest", "/v1/classify", 503),
        ("rest", "/v1/models/{model}:predict", 503),
        ("grpc", "Predict", 503),
    }
    assert [line["status"] for line in refused].count(200) == 5


def test_a_zero_refusal_budget_logs_every_refusal(capsys: pytest.CaptureFixture[str]) -> None:
    stop = configure_access_log(True, 0)
    try:
        for _ in range(200):
            finish(RequestRecord(new_request_id(), "rest", "POST"), 503, refusal=True)
    finally:
        stop()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 200 and all("not_logged" not in line for line in lines)
