"""The worker's concurrency limit (REST and gRPC share one)."""

from __future__ import annotations

import pytest

from service.concurrency import ConcurrencyLimit
from service.errors import Overloaded


def test_the_limit_admits_up_to_its_cap_and_frees_places() -> None:
    limit = ConcurrencyLimit(3)
    assert [limit.try_acquire() for _ in range(4)] == [True, True, True, False]
    refusal = limit.refusal()
    assert isinstance(refusal, Overloaded) and refusal.reason == "concurrency"
    assert refusal.retry_after and "3 requests" in refusal.message
    assert "CNNSERVE_MAX_CONCURRENT_REQUESTS" in refusal.message
    limit.release()
    assert limit.try_acquire() and not limit.try_acquire()
    with pytest.raises(ValueError):
        ConcurrencyLimit(0)
