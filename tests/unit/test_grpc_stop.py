"""gRPC's stop: new calls refused with UNAVAILABLE until they stop coming, then the
server's own stop with what is left of the one grace period."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from service.api import grpc_server
from service.api.grpc_server import QUIET_SECONDS, REFUSAL_WINDOW_SECONDS, stop_grpc


class FakeServer:
    def __init__(self) -> None:
        self.stopped: tuple[float, float] | None = None  # (when, grace)

    async def stop(self, grace: float) -> None:
        self.stopped = (asyncio.get_running_loop().time(), grace)


def test_the_refusal_window_lasts_while_calls_are_still_refused() -> None:
    """Under load the loop reached calls late and a fixed half second left some to
    gRPC's stop, which answers them CANCELLED."""

    async def scenario() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        plane = SimpleNamespace(accepting_calls=True, last_refusal_at=0.0)
        server = FakeServer()
        begun = loop.time()
        stopping = asyncio.create_task(stop_grpc(server, 10.0, plane))  # type: ignore[arg-type]
        last = begun
        while loop.time() - begun < REFUSAL_WINDOW_SECONDS + 0.5:  # calls keep coming
            await asyncio.sleep(0.02)
            assert not plane.accepting_calls and server.stopped is None
            last = plane.last_refusal_at = loop.time()
        await stopping
        assert server.stopped is not None
        return begun, last, *server.stopped  # type: ignore[return-value]

    begun, last, when, grace = asyncio.run(scenario())
    assert when - last >= QUIET_SECONDS  # once they stopped coming, not before
    assert grace <= 10.0 - (when - begun) + 0.01  # one grace period in all


def test_without_refusals_the_window_is_the_short_one() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        plane = SimpleNamespace(accepting_calls=True, last_refusal_at=0.0)
        server = FakeServer()
        begun = loop.time()
        await stop_grpc(server, 10.0, plane)  # type: ignore[arg-type]
        assert server.stopped is not None
        return server.stopped[0] - begun

    took = asyncio.run(scenario())
    assert REFUSAL_WINDOW_SECONDS <= took < grpc_server.MAX_REFUSAL_WINDOW_SECONDS
