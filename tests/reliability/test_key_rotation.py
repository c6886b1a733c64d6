"""A rotated API key file (a Kubernetes secret) reaches every worker of a replica; a
worker that cannot read it at its start fails closed instead of crash-looping."""

from __future__ import annotations

import os
import signal
from contextlib import AbstractContextManager
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.proto_gen import cnnserve_v1_pb2, cnnserve_v1_pb2_grpc
from tests.helpers.errors import error_of
from tests.helpers.images import encode, gradient
from tests.helpers.secrets import MountedSecret
from tests.helpers.server import Server, eventually, running_server, workers_of

PNG = encode(gradient(), "PNG")
PERIOD = "0.2"  # CNNSERVE_API_KEYS_POLL_SECONDS


def statuses(server: Server, key: str, count: int = 12) -> set[int]:
    """What ``count`` requests with ``key`` got, each on a new connection (the kernel
    picks the worker that accepts it)."""
    headers = {"authorization": f"Bearer {key}"}
    return {
        httpx.get(f"{server.url}/v1/models/tiny", headers=headers, timeout=30).status_code
        for _ in range(count)
    }


def keyed_server(tiny_repo: Path, secret: MountedSecret) -> AbstractContextManager[Server]:
    env = {
        "CNNSERVE_WORKERS": "2",
        "CNNSERVE_API_KEYS_FILE": str(secret.path),
        "CNNSERVE_API_KEYS_POLL_SECONDS": PERIOD,
        "CNNSERVE_POLL_SECONDS": "0",
    }
    return running_server(tiny_repo, grpc_port=0, env=env)


def test_every_worker_takes_a_rotated_secret(tiny_repo: Path, tmp_path: Path) -> None:
    """Keys were read once per worker: after a rotation the old key worked until a
    restart, and a worker respawned meanwhile knew only the new one (auth at random)."""
    secret = MountedSecret(tmp_path, "# rotate quarterly, as agreed\nold-key\n")
    with keyed_server(tiny_repo, secret) as server:
        assert statuses(server, "old-key") == {200}
        secret.rotate("new-key\n")
        eventually(lambda: statuses(server, "old-key") == {401}, 30)
        assert statuses(server, "new-key") == {200}
        with server.channel() as channel:
            stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
            request = cnnserve_v1_pb2.ClassifyRequest(image=PNG)
            metadata = (("authorization", "Bearer new-key"),)
            assert stub.Classify(request, metadata=metadata, timeout=30).model == "tiny"
        assert server.log.read_text().count("API keys reloaded") == 2
        assert server.metric("cnnserve_api_keys_file_ok") == 1

        # A rotation gone wrong: each worker says so once and keeps the keys it read.
        secret.point_nowhere()
        eventually(lambda: server.log.read_text().count("keys read before stay in use") == 2)
        assert statuses(server, "new-key") == {200}
        assert server.metric("cnnserve_api_keys_file_ok") == 0
    log = server.log.read_text()
    assert "new-key" not in log and "old-key" not in log and "quarterly" not in log


def test_workers_respawned_while_the_file_is_unreadable_fail_closed(
    tiny_repo: Path, tmp_path: Path
) -> None:
    """A worker respawned while the key file could not be read failed to start, again
    and again (11 tracebacks in 50 s), while the replica said it was ready. Now it starts
    and answers what needs a key 503 api_keys_unavailable, probes stay open, and it
    serves again once the file reads."""
    secret = MountedSecret(tmp_path, "the-key\n")
    with keyed_server(tiny_repo, secret) as server:
        secret.point_nowhere()
        for n, worker in enumerate(sorted(workers_of(server)), 1):
            os.kill(worker, signal.SIGKILL)  # one at a time: a sibling serves meanwhile
            eventually(lambda n=n: server.log.read_text().count("ready: serving") == 2 + n)
        log = server.log.read_text()
        assert log.count("requests that need a key get 503 api_keys_unavailable") == 2
        assert "Traceback" not in log

        with server.client() as client:
            for headers in ({"authorization": "Bearer the-key"}, {}):
                refused = client.get("/v1/models/tiny", headers=headers)
                assert refused.status_code == 503, refused.text
                assert refused.headers["retry-after"]
                assert error_of(refused)[0] == "api_keys_unavailable"
            classify = client.post(
                "/v1/classify", content=PNG, headers={"content-type": "image/png"}
            )
            assert classify.status_code == 503 and "CNNSERVE_API_KEYS_FILE" in classify.text
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200
        with server.channel() as channel:
            stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
            with pytest.raises(grpc.RpcError) as unavailable:
                stub.Classify(
                    cnnserve_v1_pb2.ClassifyRequest(image=PNG),
                    metadata=(("authorization", "Bearer the-key"),),
                    timeout=30,
                )
            assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert server.metric("cnnserve_api_keys_file_ok") == 0

        secret.rotate("the-key\n")
        eventually(lambda: statuses(server, "the-key") == {200}, 30)
        assert statuses(server, "wrong-key") == {401}
        assert server.metric("cnnserve_api_keys_file_ok") == 1
        assert server.process.poll() is None
