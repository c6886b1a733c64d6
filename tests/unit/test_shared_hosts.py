"""A replica's workers share the client addresses they refused (service.shared_hosts):
a real memory-mapped file, a real second process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.concurrency import RETRY_AT_ONCE_SECONDS, ConcurrencyLimit
from service.shared_hosts import SLOTS, SharedHosts, _key
from service.siblings import SIBLINGS_DIR_ENV


def test_a_refusal_one_worker_wrote_is_read_by_another(tmp_path: Path) -> None:
    first, second = SharedHosts(tmp_path), SharedHosts(tmp_path)
    assert second.refused_at("10.0.0.1") is None
    first.refused("10.0.0.1", 12.5)
    assert second.refused_at("10.0.0.1") == pytest.approx(12.5)
    assert second.refused_at("10.0.0.2") is None  # another address
    second.refused("10.0.0.1", 13.0)  # the latest refusal, whoever made it
    assert first.refused_at("10.0.0.1") == pytest.approx(13.0)


def test_another_process_reads_the_same_keys(tmp_path: Path) -> None:
    # A key made with hash() differs between processes (PYTHONHASHSEED): a worker
    # would never find its sibling's refusals.
    now = time.monotonic()
    SharedHosts(tmp_path).refused("2001:db8::7", now)
    child = (
        "import sys\n"
        "from pathlib import Path\n"
        "from service.shared_hosts import SharedHosts\n"
        "print(SharedHosts(Path(sys.argv[1])).refused_at('2001:db8::7'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345"},
    )
    assert float(out.stdout) == pytest.approx(now)


def test_an_address_pushed_out_of_its_slot_is_forgotten(tmp_path: Path) -> None:
    table = SharedHosts(tmp_path)
    first = "10.0.0.1"
    rival = next(
        f"10.1.{n // 256}.{n % 256}"
        for n in range(100_000)
        if _key(f"10.1.{n // 256}.{n % 256}") % SLOTS == _key(first) % SLOTS
    )
    table.refused(first, 1.0)
    table.refused(rival, 2.0)
    assert table.refused_at(first) is None  # never another address's time
    assert table.refused_at(rival) == pytest.approx(2.0)
    assert (tmp_path / "hosts").stat().st_size == SLOTS * 16  # bounded, however many


def test_a_worker_paces_a_new_connection_its_sibling_refused_the_address_of(
    tmp_path: Path,
) -> None:
    refusing = ConcurrencyLimit(1, refusals_per_second=100.0, shared_hosts=SharedHosts(tmp_path))
    sibling = ConcurrencyLimit(1, refusals_per_second=100.0, shared_hosts=SharedHosts(tmp_path))
    refusing.connection("10.0.0.1").refused(1.0)
    assert sibling.connection("10.0.0.1").retrying(1.0 + RETRY_AT_ONCE_SECONDS / 2, first=True)
    assert not sibling.connection("10.0.0.1").retrying(1.0 + RETRY_AT_ONCE_SECONDS, first=True)
    assert not sibling.connection("10.0.0.2").retrying(1.001, first=True)


def test_the_table_is_shared_only_between_the_workers_of_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SIBLINGS_DIR_ENV, str(tmp_path))
    assert SharedHosts.from_environment(workers=2) is not None
    assert SharedHosts.from_environment(workers=1) is None  # one process: its own dict
    monkeypatch.setenv(SIBLINGS_DIR_ENV, str(tmp_path / "gone"))
    assert SharedHosts.from_environment(workers=2) is None  # unreadable: each its own
    monkeypatch.delenv(SIBLINGS_DIR_ENV)
    assert SharedHosts.from_environment(workers=2) is None  # not started by cnnserve serve
