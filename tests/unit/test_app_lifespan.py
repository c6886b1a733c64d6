"""What a serving process sets up for itself while the app runs, and puts back after."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import GIL_SWITCH_INTERVAL_SECONDS, create_app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_a_serving_process_hands_the_gil_over_sooner_and_restores_it() -> None:
    before = sys.getswitchinterval()
    assert before != pytest.approx(GIL_SWITCH_INTERVAL_SECONDS)
    app = create_app(Settings(model_repository=ROOT / "model_repository", grpc_port=0))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_SECONDS)
    assert sys.getswitchinterval() == pytest.approx(before)
