"""Unit tests publish a version and poll the registry in the same moment: the quiet
period a copy in progress gets (service.repository.QUIET_SECONDS) is tested on its own
(test_registry.py), and off elsewhere here."""

from __future__ import annotations

import pytest

from service import repository


@pytest.fixture(autouse=True)
def _versions_settle_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repository, "QUIET_SECONDS", 0.0)
