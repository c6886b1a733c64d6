"""Readiness, hot reload, version labels and several workers, against a real server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.images import encode, gradient
from tests.helpers.models import publish_tiny, simple_config, write_models_config
from tests.helpers.server import eventually, running_server

pytestmark = pytest.mark.slow

PNG = encode(gradient(), "PNG")
RAW = {"content": PNG, "headers": {"content-type": "image/png"}}


def test_not_ready_until_a_version_is_available(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_models_config(repo, simple_config("m"))
    (repo / "m").mkdir()
    server_args = ("--poll-seconds", "0.2")
    with (
        running_server(repo, wait_ready=False, args=server_args) as server,
        server.client() as client,
    ):
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        r = client.post("/v1/classify", **RAW)  # type: ignore[arg-type]
        # Nothing to load: NOT_FOUND as TF Serving and the status route say, not a 503
        # that has clients retry every second for good.
        assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"
        assert "no version to serve" in r.json()["error"]["message"]
        assert "retry-after" not in r.headers
        publish_tiny(repo, "m")
        server.wait("/readyz", 200)
        assert client.post("/v1/classify", **RAW).json()["version"] == 1  # type: ignore[arg-type]


def test_hot_reload_without_failed_requests(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_tiny(repo, "m", seed=1)
    write_models_config(repo, simple_config("m"))
    with running_server(repo, args=("--poll-seconds", "0.2")) as server:
        failures: list[str] = []
        versions: set[int] = set()
        stop = threading.Event()

        def load() -> None:
            with server.client() as client:
                while not stop.is_set():
                    r = client.post("/v1/classify", **RAW)  # type: ignore[arg-type]
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                    else:
                        versions.add(r.json()["version"])

        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()
        try:
            eventually(lambda: 1 in versions)
            publish_tiny(repo, "m", seed=2)
            eventually(lambda: 2 in versions)
            # A broken v3 is reported and does not displace v2.
            broken = repo / "m" / "3"
            broken.mkdir()
            (broken / "saved_model.pb").write_bytes(b"this is not a SavedModel")

            def v3_failed() -> bool:
                status = httpx.get(f"{server.url}/v1/models/m").json()["model_version_status"]
                return any(s["version"] == "3" and s["state"] == "END" for s in status)

            eventually(v3_failed)
            served = {r.json()["version"] for r in [httpx.post(f"{server.url}/v1/classify", **RAW)]}  # type: ignore[arg-type]
        finally:
            stop.set()
            for w in workers:
                w.join()
        assert failures == []
        assert versions >= {1, 2} and served == {2}
        status = httpx.get(f"{server.url}/v1/models/m").json()["model_version_status"]
        v3 = next(s for s in status if s["version"] == "3")
        assert v3["status"]["error_code"] != "OK" and v3["status"]["error_message"]
        assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_version_labels_route_requests(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_tiny(repo, "m", seed=1)
    publish_tiny(repo, "m", seed=2)
    write_models_config(
        repo,
        simple_config(
            "m",
            policy="specific { versions: 1 versions: 2 }",
            labels={"stable": 1, "canary": 2},
        ),
    )
    with running_server(repo, args=("--poll-seconds", "0")) as server, server.client() as client:

        def version(**params: object) -> int:
            r = client.post("/v1/classify", params=params, **RAW)  # type: ignore[arg-type]
            assert r.status_code == 200, r.text
            v: int = r.json()["version"]
            return v

        assert version(label="stable") == 1
        assert version(label="canary") == 2
        assert version(version=1) == 1
        assert version() == 1  # stable by default, not the newest (TF Serving's rule)
        metadata = client.get("/v1/models/m/labels/canary/metadata").json()
        assert metadata["model_spec"]["version"] == "2"
        # TF Serving's status ignores a label, a known one or not: every version
        for label in ("canary", "nope"):
            status = client.get(f"/v1/models/m/labels/{label}").json()["model_version_status"]
            assert [s["version"] for s in status] == ["2", "1"]


def test_several_workers(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_tiny(repo, "m")
    write_models_config(repo, simple_config("m"))
    with running_server(repo, args=("--workers", "2", "--poll-seconds", "0")) as server:
        # running_server waited for one 200 from /readyz. Each worker loads its own copy,
        # and that 200 means every worker is ready, whichever one answered it.
        with server.client() as client:
            results = [client.post("/v1/classify", **RAW) for _ in range(20)]  # type: ignore[arg-type]
            probes = [client.get("/readyz").status_code for _ in range(10)]
        assert [r.status_code for r in results] == [200] * 20, [r.text for r in results]
        assert probes == [200] * 10
        assert len({tuple(p["score"] for p in r.json()["predictions"]) for r in results}) == 1


def test_unreadable_models_config_and_model_folder_leave_the_rest_serving(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for model in ("a", "b"):
        publish_tiny(repo, model)
    write_models_config(repo, simple_config("a", "b"))
    config = repo / "models.config"
    good = config.read_bytes()
    with running_server(repo, args=("--poll-seconds", "0.2")) as server, server.client() as client:

        def served(model: str) -> dict[str, str]:
            status = client.get(f"/v1/models/{model}").json()["model_version_status"]
            return {s["version"]: s["state"] for s in status}

        def log_lines(text: str) -> int:
            return server.log.read_text().count(text)

        # A models.config that is not UTF-8: one line, the gauge at 0, the models serve.
        config.write_bytes(good.replace(b'"b"', b'"\xe9"'))
        eventually(lambda: server.metric("cnnserve_models_config_ok") == 0)
        time.sleep(1)  # several polls: the problem is said once, not on each
        assert log_lines("is not UTF-8 text") == 1
        assert log_lines("polling the model repository failed") == 0
        assert log_lines("Traceback") == 0
        assert client.post("/v1/classify", **RAW).json()["version"] == 1  # type: ignore[arg-type]
        config.write_bytes(good)
        eventually(lambda: server.metric("cnnserve_models_config_ok") == 1)

        # b's folder cannot be listed (an entry whose stat fails, as root too): b keeps
        # its version, a still reloads, and it is no models.config problem.
        (repo / "b" / "7").symlink_to("/" + "x" * 300)  # ENAMETOOLONG
        publish_tiny(repo, "a", seed=2)
        eventually(lambda: served("a").get("2") == "AVAILABLE")
        time.sleep(1)
        assert served("b") == {"1": "AVAILABLE"}
        assert server.metric("cnnserve_models_config_ok") == 1
        assert log_lines(f"cannot list the versions in {repo / 'b'}") == 1
        assert log_lines("ignoring models.config change") == 1  # the UTF-8 one only
        assert client.get("/readyz").status_code == 200
