"""The pass/fail rule of a load test and the payloads the users send, without locust."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.loadtests import load_module

pytestmark = pytest.mark.load

thresholds = load_module("thresholds")
payloads = load_module("payloads")
run = load_module("run")


def outcome(rps: float = 1200, p99: float = 80, fail: float = 0.0, n: int = 1000) -> object:
    return thresholds.Outcome(rps=rps, p99_ms=p99, fail_ratio=fail, requests=n)


BOUNDS = thresholds.Thresholds(target_rps=1000, max_p99_ms=100, max_fail_ratio=0.01)


def test_every_bound_held_passes() -> None:
    assert thresholds.verdict(outcome(), BOUNDS) is None


@pytest.mark.parametrize(
    ("result", "words"),
    [
        (outcome(rps=999.5), "999.5 req/s < TARGET_RPS 1000"),
        (outcome(p99=101), "p99 101 ms > MAX_P99_MS 100"),
        (outcome(fail=0.02), "failure ratio 2.00% > MAX_FAIL_RATIO 0.01"),
        (outcome(n=0, rps=0), "no request completed"),
    ],
)
def test_each_broken_bound_fails_with_its_reason(result: object, words: str) -> None:
    reason = thresholds.verdict(result, BOUNDS)
    assert reason is not None and words in reason and "\n" not in reason


def test_zero_bounds_are_off() -> None:
    off = thresholds.Thresholds(target_rps=0, max_p99_ms=0, max_fail_ratio=1)
    assert thresholds.verdict(outcome(rps=1, p99=10_000, fail=0.5), off) is None


def test_payloads_cover_every_kind_and_are_deterministic() -> None:
    pool = payloads.build(fashion_count=2, photos=2)
    again = payloads.build(fashion_count=2, photos=2)
    sizes = {"fmnist28": (28, 28), "fmnist224": (224, 224), "photo224": (224, 224)}
    sizes["photo720p"] = (1280, 720)
    for kind, size in sizes.items():
        assert pool[kind], kind
        assert [p.data for p in pool[kind]] == [p.data for p in again[kind]]
        assert Image.open(io.BytesIO(pool[kind][0].data)).size == size
    assert {p.content_type for p in pool["fmnist28"]} == {"image/png", "image/jpeg"}


def test_mix_weights_are_checked_and_followed() -> None:
    with pytest.raises(ValueError, match="unknown 'xml'"):
        payloads.parse_mix("raw:1,xml:2", payloads.ENCODINGS)
    pool = payloads.build(fashion_count=1, photos=2)
    picker = payloads.Picker(pool, "photo224:1", "json:1")
    assert {picker.image().kind for _ in range(20)} == {"photo224"}
    assert {picker.encoding() for _ in range(20)} == {"json"}


def test_a_missing_dataset_is_said_not_silently_replaced(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="no Fashion-MNIST test images"):
        pool = payloads.build(fashion_count=1, photos=2, directory=tmp_path)
    assert pool["fmnist28"]  # the stand-ins keep the kind in the mix


def test_a_run_where_nothing_succeeded_fails_whatever_the_ratio_bound() -> None:
    outcome = thresholds.Outcome(rps=0.0, p99_ms=3.0, fail_ratio=1.0, requests=11523)
    reason = thresholds.verdict(outcome, thresholds.Thresholds(max_fail_ratio=1.0))
    assert reason == "no successful answer"


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        (["--host", "127.0.0.1:8000"], {}, "give http://host:port"),
        (["--encoding-mix", "raw:1,tfservng:1"], {}, "unknown 'tfservng'"),
        ([], {"USERS": "abc"}, "not a whole number"),
        (["--protocol", "mixed", "--users", "1"], {}, "--users 2 or more"),
        (["--request-timeout", "0"], {}, "above 0"),
    ],
)
def test_options_it_cannot_use_exit_2(
    argv: list[str], env: dict[str, str], words: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    for name in ("HOST", "USERS", "PROTOCOL", "ENCODING_MIX", "REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        run.parse(argv)
    assert exited.value.code == 2 and words in capsys.readouterr().err


def test_a_grpc_ca_implies_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRPC_TLS", raising=False)
    assert run.parse(["--grpc-ca", "ca.pem"]).grpc_tls is True
    monkeypatch.setenv("GRPC_TLS", "No")
    assert run.parse([]).grpc_tls is False
