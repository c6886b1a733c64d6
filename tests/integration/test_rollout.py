"""Safe rollout against real servers: `cnnserve promote` under continuous requests (the
file and TF Serving's HandleReloadConfigRequest), the canary split by client key, and
`cnnserve verify` passing on a faithful server and failing on a skewed one."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import shutil
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import text_format
from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from service import promotion
from service.config_edit import editing
from service.launch import free_port
from tests.helpers.cli import Done, cnnserve
from tests.helpers.images import encode, gradient
from tests.helpers.models import publish_tiny, write_models_config
from tests.helpers.server import ROOT, Server, eventually, running_server, self_signed

pytestmark = pytest.mark.slow

PNG = encode(gradient(), "PNG")
RAW = {"content": PNG, "headers": {"content-type": "image/png"}}
B64 = {
    "signature_name": "predict_image_bytes",
    "instances": [{"b64": base64.b64encode(PNG).decode()}],
}
DEFAULT_VERSION = ROOT / "model_repository" / "fashion_mnist" / "1"

CONFIG = """\
# Rollout test: this comment must survive every promotion.
model_config_list {
  config {
    name: "m"
    base_path: "/models/m"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 1 }  # moved by cnnserve promote
  }
}
"""


# --no-wait with a --url nothing answers at: a gateway a developer runs on the default
# address serving a model of that name would refuse it.
NO_SERVER = ("--no-wait", "--url", "http://127.0.0.1:9")


def promote(repo: Path, label: str, *args: str) -> Done:
    """`cnnserve promote m 2 --label LABEL` on ``repo``."""
    return cnnserve("promote", "m", "2", "--label", label, "--model-repository", str(repo), *args)


def two_versions(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    publish_tiny(repo, "m", seed=1)
    publish_tiny(repo, "m", seed=2)
    (repo / "models.config").write_text(CONFIG)
    return repo


class Traffic:
    """Threads sending unlabelled and labelled requests, by every route, until stopped;
    every non-200 is a failure. ``seen[kind]`` holds the versions that answered."""

    KINDS = ("unlabelled", "stable", "canary", "predict_canary", "status_stable")

    def __init__(self, server: Server, threads: int = 3) -> None:
        self.server = server
        self.failures: list[str] = []
        self.seen: dict[str, set[int]] = defaultdict(set)
        self.count = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _one(self, client: httpx.Client, kind: str) -> None:
        if kind == "predict_canary":
            r = client.post("/v1/models/m/labels/canary:predict", json=B64)
        elif kind == "status_stable":
            r = client.get("/v1/models/m/labels/stable")
        else:
            params = {} if kind == "unlabelled" else {"label": kind}
            r = client.post("/v1/classify", params=params, **RAW)  # type: ignore[arg-type]
        if r.status_code != 200:
            self.failures.append(f"{kind}: {r.status_code} {r.text}")
        elif kind == "status_stable":
            self.seen[kind].add(int(r.json()["model_version_status"][0]["version"]))
        elif "version" in r.json():
            self.seen[kind].add(r.json()["version"])
        self.count += 1

    def _run(self, offset: int) -> None:
        with self.server.client() as client:
            i = offset
            while not self._stop.is_set():
                self._one(client, self.KINDS[i % len(self.KINDS)])
                i += 1

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def test_promote_moves_labels_under_load_without_a_failed_request(tmp_path: Path) -> None:
    repo = two_versions(tmp_path)
    with running_server(repo, args=("--poll-seconds", "0.2")) as server, Traffic(server) as load:
        eventually(lambda: load.count > 20)
        done = promote(repo, "canary", "--url", server.url)
        assert done.returncode == 0, done.stderr
        assert "step 1/3 (load): serve versions 1, 2" in done.stdout
        assert "m version 2 is AVAILABLE" in done.stdout
        eventually(lambda: 2 in load.seen["canary"])
        assert load.seen["stable"] == {1}

        done = promote(repo, "stable", "--url", server.url)
        assert done.returncode == 0, done.stderr
        assert "step 3/3 (drop): drop version 1" in done.stdout

        def v1_unloaded() -> bool:
            status = httpx.get(f"{server.url}/v1/models/m").json()["model_version_status"]
            return {s["version"]: s["state"] for s in status}.get("1") == "END"

        eventually(v1_unloaded)
        before = load.count
        eventually(lambda: load.count > before + 20)
    assert load.failures == []
    assert load.seen["stable"] == {1, 2} and load.seen["status_stable"] == {1, 2}
    assert load.seen["canary"] == {1, 2} and 2 in load.seen["unlabelled"]
    text = (repo / "models.config").read_text()
    assert "# Rollout test: this comment must survive every promotion." in text
    assert "# moved by cnnserve promote" in text
    assert "model_version_policy { specific { versions: 2 } }" in text


def test_promote_through_a_gateways_grpc_port_waits_for_every_worker(tmp_path: Path) -> None:
    """A gateway's gRPC port is several worker processes: the reload RPC reaches one,
    the others follow on their next poll. Promote waited on one channel (one worker)
    and said the label had moved everywhere while another answered the old version for
    ~1 s (an outside audit, 12-07). Right after it, new connections all agree."""
    from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

    repo = two_versions(tmp_path)
    env = {"CNNSERVE_RELOAD_CONFIG_RPC": "true"}
    args = ("--poll-seconds", "1", "--workers", "2")
    with running_server(repo, grpc_port=0, env=env, args=args) as server:
        done = promote(repo, "canary", "--tfserving", server.grpc_target)
        assert done.returncode == 0, done.stderr
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name, request.model_spec.version_label = "m", "canary"
        seen = set()
        for _ in range(16):
            # A connection of its own (a new channel shares an open one otherwise):
            # either worker.
            own = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(server.grpc_target, options=own) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                seen.add(stub.GetModelMetadata(request, timeout=30).model_spec.version.value)
        assert seen == {2}


def test_promote_through_handle_reload_config_request_then_split(tmp_path: Path) -> None:
    repo = two_versions(tmp_path)
    env = {"CNNSERVE_RELOAD_CONFIG_RPC": "true", "CNNSERVE_CANARY_PERCENT": "25"}
    with running_server(repo, grpc_port=0, env=env, args=("--poll-seconds", "0")) as server:
        # One step, as TF Serving users try first: refused, the label's version is not loaded.
        one_step = text_format.Parse(
            CONFIG.replace("versions: 1 }", "versions: 1 versions: 2 }").replace(
                'key: "canary" value: 1', 'key: "canary" value: 2'
            ),
            model_server_config_pb2.ModelServerConfig(),
        )
        with server.channel() as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.HandleReloadConfigRequest(
                    model_management_pb2.ReloadConfigRequest(config=one_step), timeout=30
                )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # as TF Serving
        assert "not currently available" in (refused.value.details() or "")
        assert (repo / "models.config").read_text() == CONFIG

        done = promote(repo, "canary", "--tfserving", server.grpc_target)
        assert done.returncode == 0, done.stderr
        # The config as it now is, again: answered with its status set, OK (TF Serving
        # always sets it; it was left unset).
        again = text_format.Parse(
            (repo / "models.config").read_text(), model_server_config_pb2.ModelServerConfig()
        )
        with server.channel() as channel:
            answer = model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
                model_management_pb2.ReloadConfigRequest(config=again), timeout=30
            )
        assert answer.HasField("status") and answer.status.error_code == 0
        with server.client() as client:
            metadata = client.get("/v1/models/m/labels/canary/metadata").json()
            assert metadata["model_spec"]["version"] == "2"
            r = client.post("/v1/classify", params={"label": "canary"}, **RAW)  # type: ignore[arg-type]
            assert r.json()["version"] == 2
            assert "# moved by cnnserve promote" in (repo / "models.config").read_text()

            # The split: 25% of unlabelled requests to canary (2), the rest to stable (1),
            # one side per X-Client-Key.
            def version(key: str) -> int:
                headers = {"x-client-key": key, "content-type": "image/png"}
                r = client.post("/v1/classify", headers=headers, content=PNG)
                assert r.status_code == 200, r.text
                return int(r.json()["version"])

            first = {f"user-{i}": version(f"user-{i}") for i in range(200)}
            share = sum(v == 2 for v in first.values()) / len(first)
            assert set(first.values()) == {1, 2}
            assert 0.25 - 0.14 < share < 0.25 + 0.14  # 4.5 sigma for n = 200
            assert all(version(k) == v for k, v in list(first.items())[:40])


def test_promote_on_a_latest_policy_pins_what_the_gateway_serves(tmp_path: Path) -> None:
    """Newest folder broken, so latest 1 serves 2: promoting 1 pinned {1, 3}, which
    unloaded the serving 2 and left the broken 3 in the policy."""
    repo = two_versions(tmp_path)
    (repo / "models.config").write_text(
        CONFIG.replace("specific { versions: 1 }", "latest { num_versions: 1 }")
        .replace('version_labels { key: "stable" value: 1 }\n', "")
        .replace('version_labels { key: "canary" value: 1 }  # moved by cnnserve promote\n', "")
    )
    with running_server(repo, args=("--poll-seconds", "0.2")) as server:
        broken = repo / "m" / ".3.tmp"
        shutil.copytree(repo / "m" / "2", broken)
        (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
        broken.rename(repo / "m" / "3")
        with server.client() as client:

            def failed() -> bool:  # a 404 until a poll has seen the folder
                answer = client.get("/v1/models/m/versions/3")
                return answer.status_code == 200 and (
                    answer.json()["model_version_status"][0]["state"] == "END"
                )

            eventually(failed)
        done = cnnserve(
            "promote", "m", "1", "--label", "canary", "--model-repository", str(repo),
            "--url", server.url,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        text = (repo / "models.config").read_text()
        assert "specific { versions: 1 versions: 2 }" in text, text
        assert 'key: "canary" value: 1' in text


def test_promote_uses_the_gateways_own_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With API keys on, promote's status calls were 401s: it waited in vain. It reads
    the key as the server does (CNNSERVE_API_KEYS or the key file)."""
    repo = two_versions(tmp_path)
    env = {"CNNSERVE_API_KEYS": "rollout-key"}
    with running_server(repo, args=("--poll-seconds", "0.2"), env=env) as server:
        monkeypatch.setenv("CNNSERVE_API_KEYS", "rollout-key")
        done = promote(repo, "canary", "--url", server.url, "--timeout", "60")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "m version 2 is AVAILABLE" in done.stdout
        assert 'key: "canary" value: 2' in (repo / "models.config").read_text()


def test_verify_and_promote_reach_a_gateway_with_keys_and_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With API keys and TLS on, `verify` (REST and gRPC) and `promote` send the
    gateway's own key (gRPC's as metadata: it had sent none) and trust the certificate
    given as --ca-cert. Without it, without --tls, or without the key: one clear error,
    exit 2 (verify's "cannot check"), never the gate's 1 or a traceback."""
    repo = two_versions(tmp_path)
    shutil.copytree(DEFAULT_VERSION, repo / "fashion_mnist" / "1")
    fashion = (
        '  config { name: "fashion_mnist" base_path: "/models/fashion_mnist" '
        'model_platform: "tensorflow" }\n'
    )
    (repo / "models.config").write_text(CONFIG[: CONFIG.rindex("}")] + fashion + "}\n")
    cert, key = self_signed(tmp_path)
    env = {
        "CNNSERVE_API_KEYS": "rollout-key",
        "CNNSERVE_TLS_CERTFILE": str(cert),
        "CNNSERVE_TLS_KEYFILE": str(key),
    }
    args = ("--poll-seconds", "0.2")
    with running_server(repo, grpc_port=0, args=args, env=env, tls_ca=cert) as server:
        monkeypatch.setenv("CNNSERVE_API_KEYS", "rollout-key")
        common = ("--model", "fashion_mnist", "--limit", "20", "--model-repository", str(repo))
        common += ("--output", str(tmp_path / "verify"))
        trusted = ("--ca-cert", str(cert))
        rest = cnnserve("verify", "--url", server.url, *trusted, *common)
        assert rest.returncode == 0, rest.stdout + rest.stderr
        assert "agreement 100.00%" in rest.stdout
        grpc_target = ("--grpc", server.grpc_target)
        over_grpc = cnnserve("verify", *grpc_target, "--tls", *trusted, *common)
        assert over_grpc.returncode == 0, over_grpc.stdout + over_grpc.stderr
        assert "agreement 100.00%" in over_grpc.stdout

        untrusted = cnnserve("verify", "--url", server.url, *common)
        assert untrusted.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
        assert "give its certificate with --ca-cert" in untrusted.stderr
        plaintext = cnnserve("verify", *grpc_target, *common)
        assert plaintext.returncode == 2, plaintext.stdout + plaintext.stderr
        assert f"no answer from {server.grpc_target}" in plaintext.stderr
        assert "--tls" in plaintext.stderr
        not_a_cert = cnnserve("verify", *grpc_target, "--tls", "--ca-cert", str(key), *common)
        assert not_a_cert.returncode == 2 and "no PEM certificate in it" in not_a_cert.stderr
        rest_tls = cnnserve("verify", "--url", server.url, "--tls", *trusted, *common)
        assert rest_tls.returncode == 2 and "--tls is for --grpc" in rest_tls.stderr
        plain_url = f"http://127.0.0.1:{server.port}"
        pointless = cnnserve("verify", "--url", plain_url, *trusted, *common)
        assert pointless.returncode == 2 and "--ca-cert is for an https://" in pointless.stderr
        implied = cnnserve("verify", *grpc_target, *trusted, *common)  # --ca-cert: TLS
        assert implied.returncode == 0, implied.stdout + implied.stderr
        monkeypatch.setenv("CNNSERVE_API_KEYS_FILE", str(tmp_path / "missing"))
        no_file = cnnserve("verify", *grpc_target, *trusted, *common)
        assert no_file.returncode == 2 and "missing" in no_file.stderr  # not the gate's 1
        monkeypatch.delenv("CNNSERVE_API_KEYS_FILE")
        monkeypatch.delenv("CNNSERVE_API_KEYS")
        keyless = cnnserve("verify", *grpc_target, "--tls", *trusted, *common)
        assert keyless.returncode == 2 and "UNAUTHENTICATED" in keyless.stderr
        assert "Traceback" not in untrusted.stderr + plaintext.stderr + keyless.stderr

        before = (repo / "models.config").read_text()
        untrusting = promote(repo, "canary", "--url", server.url, "--timeout", "60")
        assert untrusting.returncode == 1 and "--ca-cert" in untrusting.stderr
        monkeypatch.setenv("CNNSERVE_API_KEYS", "not-the-key")
        wrong_key = promote(repo, "canary", "--url", server.url, *trusted, "--timeout", "60")
        assert wrong_key.returncode == 1 and "401" in wrong_key.stderr
        assert "CNNSERVE_API_KEYS" in wrong_key.stderr
        # Neither was taken for "no gateway": nothing was written.
        assert (repo / "models.config").read_text() == before
        monkeypatch.setenv("CNNSERVE_API_KEYS", "rollout-key")
        done = promote(repo, "canary", "--url", server.url, *trusted, "--timeout", "60")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "m version 2 is AVAILABLE" in done.stdout
        assert 'key: "canary" value: 2' in (repo / "models.config").read_text()


def test_promote_refuses_what_would_leave_the_config_at_odds_with_the_gateway(
    tmp_path: Path,
) -> None:
    """Two ways an outside review left a repository that served nothing after a restart:
    --no-wait while a gateway served the model (a version that did not load stayed
    pinned and labelled: the undo needs the wait), and a --model-repository that is not
    the one the gateway at --url serves (its versions were written into that config).
    Both are refused before anything is written."""
    repo = two_versions(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(repo / "m" / "2", other / "m" / "2")  # not version 1, which is served
    (other / "models.config").write_text(CONFIG)
    probe_port = free_port()
    env = {"CNNSERVE_PROBE_PORT": str(probe_port)}
    with running_server(repo, args=("--poll-seconds", "0.2"), env=env) as server:
        no_wait = promote(repo, "canary", "--url", server.url, "--no-wait")
        elsewhere = promote(other, "canary", "--url", server.url, "--timeout", "30")
        # Its probe port answers a model's status 404, as a gateway that has not polled
        # yet does: promote planned without what was served (an outside audit).
        probe = promote(repo, "canary", "--url", f"http://127.0.0.1:{probe_port}")
    assert probe.returncode == 1, probe.stdout + probe.stderr
    assert "answered 404 not_found" in probe.stderr and "not its probe port" in probe.stderr
    assert no_wait.returncode == 1, no_wait.stdout + no_wait.stderr
    assert f"a gateway at {server.url} serves m (versions: 1)" in no_wait.stderr
    assert "--no-wait is for a repository no server serves" in no_wait.stderr
    assert elsewhere.returncode == 1, elsewhere.stdout + elsewhere.stderr
    assert f"serves versions 1 of m, none of which is in {other}" in elsewhere.stderr
    assert "Traceback" not in no_wait.stderr + elsewhere.stderr + probe.stderr
    assert (repo / "models.config").read_text() == CONFIG
    assert (other / "models.config").read_text() == CONFIG


def test_promote_without_a_server_stops_after_step_one(tmp_path: Path) -> None:
    repo = two_versions(tmp_path)
    done = promote(repo, "canary", "--url", "http://127.0.0.1:9", "--timeout", "5")
    assert done.returncode == 3, done.stderr
    assert "Step 1 is applied; the label was not moved" in done.stderr
    text = (repo / "models.config").read_text()
    assert "versions: 1 versions: 2" in text and 'key: "canary" value: 1' in text


def test_promote_on_a_latest_policy_without_a_server_writes_nothing(tmp_path: Path) -> None:
    """A mistyped --url: what the latest policy serves is unknown, and the newest folders
    pinned in its place unloaded the version a gateway elsewhere served (an outside
    review). It stops before writing, unless --no-wait says no server serves the files."""
    repo = two_versions(tmp_path)
    latest = (
        CONFIG.replace("specific { versions: 1 }", "latest { num_versions: 1 }")
        .replace('version_labels { key: "stable" value: 1 }\n', "")
        .replace('version_labels { key: "canary" value: 1 }  # moved by cnnserve promote\n', "")
    )
    (repo / "models.config").write_text(latest)
    done = promote(repo, "canary", "--url", "http://127.0.0.1:9", "--timeout", "5")
    assert done.returncode not in (0, 3), done.stderr
    assert "could unload the version a server serves" in done.stderr
    assert "nothing was written" in done.stderr and "Traceback" not in done.stderr
    assert (repo / "models.config").read_text() == latest
    assert promote(repo, "canary", "--url", "http://127.0.0.1:9", "--no-wait").returncode == 0
    assert 'key: "canary" value: 2' in (repo / "models.config").read_text()


def test_promote_against_a_url_that_is_no_gateway_writes_nothing(tmp_path: Path) -> None:
    """A web server that is not the gateway (its 404 page): read as "the gateway has not
    polled yet" before, promote planned without what was served, wrote step 1 and waited
    out its timeout. It stops before writing, naming --url."""
    repo = two_versions(tmp_path)
    before = (repo / "models.config").read_text()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{web.server_address[1]}"
            done = promote(repo, "canary", "--url", url, "--timeout", "60")
        finally:
            web.shutdown()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "not as a cnnserve gateway or TF Serving would" in done.stderr, done.stderr
    assert "is --url the REST address" in done.stderr and "Traceback" not in done.stderr
    assert (repo / "models.config").read_text() == before


def test_promote_names_what_it_could_not_find_and_writes_nothing(tmp_path: Path) -> None:
    """A model name typo lists the models there; a TF Serving that does not answer is
    named by its address. Either way models.config is untouched."""
    repo = two_versions(tmp_path)
    before = (repo / "models.config").read_text()

    typo = cnnserve("promote", "mm", "2", "--label", "canary", "--model-repository", str(repo))
    assert typo.returncode == 1
    assert "no model 'mm' (models there: m)" in typo.stderr

    address = f"127.0.0.1:{free_port()}"
    down = promote(repo, "canary", "--tfserving", address, "--timeout", "5")
    assert down.returncode == 1
    assert f"TF Serving at {address} cannot be reached" in down.stderr
    assert "Traceback" not in typo.stderr + down.stderr
    assert (repo / "models.config").read_text() == before


def test_verify_passes_on_a_faithful_server_and_fails_on_a_skewed_one(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(DEFAULT_VERSION, repo / "fashion_mnist" / "1")
    shutil.copytree(DEFAULT_VERSION, repo / "fashion_mnist" / "2")
    card_path = repo / "fashion_mnist" / "2" / "assets.extra" / "model_card.json"
    card = json.loads(card_path.read_text())
    card["preprocessing"]["resize_method"] = "nearest"  # the server resizes differently
    card_path.write_text(json.dumps(card))
    write_models_config(
        repo,
        'config { name: "fashion_mnist" base_path: "/models/fashion_mnist" '
        'model_platform: "tensorflow" '
        "model_version_policy { specific { versions: 1 versions: 2 } } }",
    )
    with running_server(repo, grpc_port=0, args=("--poll-seconds", "0")) as server:
        common = ("--url", server.url, "--model", "fashion_mnist", "--limit", "200")
        common += ("--model-repository", str(repo))
        good = cnnserve("verify", *common, "--version", "1", "--output", str(tmp_path / "good"))
        assert good.returncode == 0, good.stdout + good.stderr
        assert "png   accuracy served" in good.stdout and "agreement 100.00%" in good.stdout
        assert "verify: png 200/200 images" in good.stderr  # progress on stderr
        assert "verify: test images: Fashion-MNIST's test set, this version's test split" in (
            good.stderr
        )
        skewed = cnnserve("verify", *common, "--version", "2", "--output", str(tmp_path / "bad"))
        assert skewed.returncode == 1, skewed.stdout + skewed.stderr
        assert "FAIL" in skewed.stdout
        report = json.loads((tmp_path / "bad" / "report.json").read_text())
        assert not report["passed"] and report["encodings"]["png"]["agreement"] < 0.999
        worst = report["encodings"]["png"]["worst"][0]
        assert Path(worst["saved"]).is_file()
        # TF Serving's Predict on the bytes signature, as against a TF Serving itself.
        over_grpc = cnnserve(
            "verify", "--grpc", server.grpc_target, "--model", "fashion_mnist", "--label",
            "none", "--limit", "50", "--model-repository", str(repo),
        )  # fmt: skip
        assert over_grpc.returncode == 2 and "no version label 'none'" in over_grpc.stderr
        # A repository it cannot read is not a skew: exit 2, not the gate's 1.
        empty = tmp_path / "empty"
        empty.mkdir()
        unread = cnnserve("verify", "--url", server.url, "--model-repository", str(empty))
        assert unread.returncode == 2 and "models.config" in unread.stderr, unread.stderr
        over_grpc = cnnserve(
            "verify", "--grpc", server.grpc_target, "--model", "fashion_mnist", "--version",
            "2", "--limit", "50", "--model-repository", str(repo), "--output", str(tmp_path),
        )  # fmt: skip
        assert over_grpc.returncode == 1 and "at " + server.grpc_target in over_grpc.stdout


def test_verify_of_a_label_that_moves_while_it_runs_cannot_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify --label checks the version the label names when it begins (each request
    names that version); the label moved meanwhile and it exited 0, as if the label's
    new version had been checked (an outside audit, 12-07). Now the report is printed,
    and the run is one that cannot check (exit 2 from the CLI), saying so."""
    from service import verify
    from service.config import Settings
    from service.errors import DatasetError
    from service.verify_clients import RestServer

    repo = tmp_path / "repo"
    for version in ("1", "2"):
        shutil.copytree(DEFAULT_VERSION, repo / "fashion_mnist" / version)
    entry = (
        'config {{ name: "fashion_mnist" base_path: "/models/fashion_mnist" '
        'model_platform: "tensorflow" model_version_policy {{ specific {{ versions: 1 '
        'versions: 2 }} }} version_labels {{ key: "canary" value: {} }} }}'
    )
    write_models_config(repo, entry.format(1))
    serve_all = verify.serve_all
    with running_server(repo, args=("--poll-seconds", "0.2")) as server:
        client = RestServer(server.url)

        def moved_midway(*args: Any, **kwargs: Any) -> Any:
            if client.label_version("fashion_mnist", "canary") == 1:
                write_models_config(repo, entry.format(2))
                eventually(lambda: client.label_version("fashion_mnist", "canary") == 2)
            return serve_all(*args, **kwargs)

        monkeypatch.setattr(verify, "serve_all", moved_midway)
        out = io.StringIO()
        with pytest.raises(DatasetError, match="moved from version 1 to 2 while this ran"):
            verify.run_verify(
                client,
                repository=repo,
                cache_dir=tmp_path / "cache",
                images=lambda card: verify.card_test_images(card, Settings().fashion_mnist_dir, 20),
                model="fashion_mnist",
                version=None,
                label="canary",
                output=None,
                out=out,
                progress_out=io.StringIO(),
            )
        client.close()
    assert "version 1" in out.getvalue()  # the report, of the version it checked


def test_promotes_of_one_repository_take_turns(tmp_path: Path) -> None:
    """Each plans its steps from the file as read and writes them minutes apart: two at
    once each wrote its own plan over the other's (a label lost, both exit 0)."""
    repo = two_versions(tmp_path)
    before = (repo / "models.config").read_text()
    with editing(repo) as mine:
        assert mine
        done = promote(repo, "canary", *NO_SERVER)
    assert done.returncode == 1, done.stderr
    assert "another cnnserve promote is changing" in done.stderr
    assert (repo / "models.config").read_text() == before
    assert promote(repo, "canary", *NO_SERVER).returncode == 0  # the lock went with it


def test_an_edit_while_promote_waits_is_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = two_versions(tmp_path)
    config = repo / "models.config"

    def available(self: object, model: str, version: int) -> None:
        config.write_text(config.read_text() + "# a hand edit\n")

    monkeypatch.setattr(promotion.GatewayStatus, "serving", lambda self, model: {1, 2})
    monkeypatch.setattr(promotion.GatewayStatus, "available", available)
    done = promote(repo, "canary", "--timeout", "5")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "changed while this promote waited" in done.stderr
    assert "Traceback" not in done.stderr
    assert config.read_text().endswith("# a hand edit\n")  # kept, nothing written after


def test_promote_refuses_a_url_that_does_not_parse(tmp_path: Path) -> None:
    repo = two_versions(tmp_path)
    done = promote(repo, "canary", "--url", "http://[::1")
    assert done.returncode == 1 and "is not a URL" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_an_empty_version_folder_is_not_promoted(tmp_path: Path) -> None:
    repo = two_versions(tmp_path)
    (repo / "m" / "3").mkdir()  # a copy not made yet, or a failed one
    before = (repo / "models.config").read_text()
    done = cnnserve(
        "promote", "m", "3", "--label", "canary", "--model-repository", str(repo), *NO_SERVER
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "version 3 of m is not published" in done.stderr
    assert "versions there: [1, 2]" in done.stderr
    assert (repo / "models.config").read_text() == before
