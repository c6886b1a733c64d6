"""What the gateway checks of what a TF Serving backend, or its operator, tells it:
its address, the versions it lists, the image size its signature asks for; and the
longest deadline a client may ask for."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from tensorflow_serving.apis import get_model_status_pb2

from service.config import Settings
from service.dataplane import DataPlane
from service.errors import ModelLoadError
from service.runtimes.card import TensorDesc, describe
from service.tfserving_proto import available_versions


@pytest.mark.parametrize("address", ["tfserving:8500", "127.0.0.1:1", "[::1]:8500", "dns:///t:1"])
def test_a_backend_address_is_host_and_port(address: str) -> None:
    assert Settings(tfserving_address=address).tfserving_address == address


@pytest.mark.parametrize(
    ("address", "said"),
    [
        ("http://127.0.0.1:8500", "is not host:port"),
        ("", "is not host:port"),
        ("127.0.0.1", "is not host:port"),  # gRPC took port 443
        ("127.0.0.1:99999", "the port must be 1 to 65535"),  # it connected to another
    ],
)
def test_a_backend_address_that_is_not_one_stops_start_up(address: str, said: str) -> None:
    """Each started a gateway that stayed unready for good."""
    with pytest.raises(ValidationError, match=said):
        Settings(tfserving_address=address)


def test_a_negative_version_listed_by_the_backend_is_no_version() -> None:
    """A version -5 listed AVAILABLE was served as version -5, and a request naming no
    version got a 400 for it."""
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    response = get_model_status_pb2.GetModelStatusResponse()
    for version in (-5, 0, 3):
        response.model_version_status.add(version=version, state=available)
    assert available_versions(response) == [0, 3]


@pytest.mark.parametrize("side", [0, 20_000])
def test_an_input_of_no_pixels_or_of_gigabytes_is_refused_at_load(side: int) -> None:
    """A backend's signature of 0 x 0 loaded, and every image request was a 500."""
    inputs = {"image": TensorDesc("uint8", (None, side, side, 3))}
    outputs = {"probabilities": TensorDesc("float32", (None, 10))}
    with pytest.raises(ModelLoadError, match="height and width known, 1 to 16384"):
        describe(inputs, outputs, None, Path("TF Serving/m/1"))


def test_a_client_deadline_is_cut_to_the_longest_allowed() -> None:
    settings = Settings(max_request_timeout_seconds=60, request_timeout_seconds=10)
    plane = DataPlane.__new__(DataPlane)  # deadline() reads only the settings
    plane.settings = settings
    now = time.monotonic()
    assert plane.deadline(100_000, since=now) == now + 60
    assert plane.deadline(5, since=now) == now + 5
    # The default is never cut, whatever the cap.
    plane.settings = Settings(max_request_timeout_seconds=5, request_timeout_seconds=30)
    assert plane.deadline(None, since=now) == now + 30
