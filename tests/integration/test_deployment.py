"""The container's command lines run for real: the Dockerfile's ENTRYPOINT + CMD with its
ENV serve the committed repository, its HEALTHCHECK passes once the server is ready and
fails when it is gone, and the TF Serving healthcheck (compose) and readiness probe
(Kubernetes) recognise an AVAILABLE model in TF Serving's REST status, answered here by
the gateway's TF-Serving-compatible REST API (TF Serving itself cannot run here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dockerfile_parse import DockerfileParser

from service.launch import free_port, wait_for
from tests.helpers.deployment import DOCKERFILE, REPOSITORY, ROOT, load_compose
from tests.helpers.server import eventually, self_signed, stop

pytestmark = pytest.mark.slow

VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"


def dockerfile_command(instruction: str) -> list[str]:
    (value,) = [
        i["value"]
        for i in DockerfileParser(str(DOCKERFILE)).structure
        if i["instruction"] == instruction
    ]
    if instruction == "HEALTHCHECK":
        value = value[value.index("CMD") + len("CMD") :].strip()
    command: list[str] = json.loads(value)
    return command


def run_check(command: list[str], env: dict[str, str]) -> int:
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode


class Image:
    """`cnnserve` started as the image starts it (ENTRYPOINT, then ``cmd`` or the image's
    CMD, with its ENV and ``env``), ports and paths made local."""

    def __init__(
        self, tmp: Path, cmd: list[str] | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.grpc_port = next(p for p in iter(free_port, None) if p != self.port)
        taken = (self.port, self.grpc_port)
        self.probe_port = next(p for p in iter(free_port, None) if p not in taken)
        image_env = DockerfileParser(str(DOCKERFILE)).envs
        self.env = {
            **os.environ,
            **{k: v for k, v in image_env.items() if k not in ("PATH", "HOME")},
            **(env or {}),
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(tmp),
            # The image's values would bind every interface and read /models.
            "CNNSERVE_HOST": "127.0.0.1",
            "CNNSERVE_PORT": str(self.port),
            "CNNSERVE_GRPC_PORT": str(self.grpc_port),
            "CNNSERVE_PROBE_PORT": str(self.probe_port),
            "CNNSERVE_MODEL_REPOSITORY": str(REPOSITORY),
            "CNNSERVE_CACHE_DIR": str(tmp / "cache"),
            "CNNSERVE_WORKERS": "1",
        }
        argv = dockerfile_command("ENTRYPOINT") + (cmd or dockerfile_command("CMD"))
        executable = shutil.which(argv[0], path=self.env["PATH"])
        assert executable == str(VENV_BIN / "cnnserve"), executable
        self.log = tmp / f"server-{self.port}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                argv, cwd=tmp, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        try:
            wait_for(self.url + "/readyz", self.process, 200, timeout=120)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}:\n{self.log.read_text()}") from None


def classify(url: str) -> httpx.Response:
    png = (ROOT / "docs" / "samples" / "ankle_boot.png").read_bytes()
    return httpx.post(
        url + "/v1/classify", content=png, headers={"content-type": "image/png"}, timeout=30
    )


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    with tempfile.TemporaryDirectory() as tmp:
        started = Image(Path(tmp))
        healthcheck = dockerfile_command("HEALTHCHECK")
        # Not healthy before it answers; `docker` retries until it is.
        assert run_check(healthcheck, started.env) != 0
        started.wait_ready()
        yield started
        stop(started.process)
        assert run_check(healthcheck, started.env) != 0, "healthy after the server stopped"


def test_image_command_serves_the_repository_and_is_healthy(image: Image) -> None:
    healthcheck = dockerfile_command("HEALTHCHECK")
    assert run_check(healthcheck, image.env) == 0
    # It asks the probe port (nothing listens on another), or the REST port without one.
    assert run_check(healthcheck, image.env | {"CNNSERVE_PROBE_PORT": str(free_port())}) != 0
    assert run_check(healthcheck, image.env | {"CNNSERVE_PROBE_PORT": "0"}) == 0
    # The Kubernetes probes' paths and port; the REST port answers them too.
    probes = f"http://127.0.0.1:{image.probe_port}"
    for url in (probes, image.url):
        assert httpx.get(url + "/healthz").status_code == 200
        assert httpx.get(url + "/readyz").status_code == 200
    assert httpx.post(probes + "/v1/classify").status_code == 404
    r = classify(image.url)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "Ankle boot"


def test_compose_gateway_command_fronts_a_tf_serving(image: Image, tmp_path: Path) -> None:
    """The stack's `gateway` service (and the Kubernetes gateway: same arguments), its
    TF Serving played by the first server's TF-Serving-compatible gRPC API."""
    service = load_compose()["services"]["gateway"]
    cmd = [a.replace("tfserving:8500", f"127.0.0.1:{image.grpc_port}") for a in service["command"]]
    assert cmd != service["command"], "the gateway no longer names tfserving:8500"
    gateway = Image(tmp_path, cmd, service["environment"])
    try:
        gateway.wait_ready()
        assert run_check(dockerfile_command("HEALTHCHECK"), gateway.env) == 0
        r = classify(gateway.url)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["label"] == "Ankle boot"
        assert r.json()["version"] == 1
    finally:
        stop(gateway.process)


def test_tf_serving_healthcheck_sees_an_available_model(image: Image) -> None:
    command = load_compose()["services"]["tfserving"]["healthcheck"]["test"]
    assert command[:2] == ["CMD", "bash"]
    script = command[-1]
    assert "/dev/tcp/127.0.0.1/8501" in script
    local = [*command[1:-1], script.replace("/8501", f"/{image.port}")]
    assert run_check(local, image.env) == 0
    # A model that is not AVAILABLE (unknown here) fails the check.
    missing = [*local[:-1], local[-1].replace("/v1/models/fashion_mnist", "/v1/models/nope")]
    assert run_check(missing, image.env) != 0
    # And nothing listening fails it too.
    closed = [*local[:-1], script.replace("/8501", f"/{free_port()}")]
    start = time.monotonic()
    assert run_check(closed, image.env) != 0
    assert time.monotonic() - start < 10


def test_healthcheck_follows_the_image_to_tls_and_api_keys(tmp_path: Path) -> None:
    """A gateway serving TLS (and requiring API keys) is healthy once ready: the
    HEALTHCHECK speaks https when CNNSERVE_TLS_CERTFILE is set (over http it could never
    pass: the container stayed unhealthy for good), and /readyz needs no key."""
    cert, key = self_signed(tmp_path)
    env = {
        "CNNSERVE_TLS_CERTFILE": str(cert),
        "CNNSERVE_TLS_KEYFILE": str(key),
        "CNNSERVE_API_KEYS": "a-key-the-probe-does-not-have",
    }
    gateway = Image(tmp_path, env=env)
    healthcheck = dockerfile_command("HEALTHCHECK")
    try:
        url = f"https://127.0.0.1:{gateway.port}"

        def ready() -> bool:
            assert gateway.process.poll() is None, gateway.log.read_text()
            try:
                return httpx.get(url + "/readyz", verify=False).status_code == 200
            except httpx.TransportError:
                return False

        eventually(ready, timeout=120)
        assert run_check(healthcheck, gateway.env) == 0
        assert httpx.get(url + "/v1/models/fashion_mnist", verify=False).status_code == 401
    finally:
        stop(gateway.process)
    assert run_check(healthcheck, gateway.env) != 0, "healthy after the server stopped"
