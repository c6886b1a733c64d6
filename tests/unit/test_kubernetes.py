"""docker/k8s/: the base and every overlay, rendered as kustomize would, validate with
kubernetes-validate --strict, and agree with the repository, TF Serving, the gateway's
CLI and settings, and the compose stack."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import tensorflow as tf
import yaml
from dockerfile_parse import DockerfileParser

from service import metrics
from service.cli import build_parser
from service.config import Settings
from service.repository import (
    load_batching_parameters,
    load_models_config,
    load_monitoring_config,
)
from tests.helpers.deployment import (
    DOCKERFILE,
    K8S,
    REPOSITORY,
    TFSERVING_FILE_FLAGS,
    TFSERVING_FLAGS,
    apply_json6902,
    find,
    kustomizations,
    load_compose,
    render_kustomization,
    tfserving_flags,
)

KUBERNETES_VERSION = kubernetes_validate.latest_version()
BASE = K8S / "base"
DEPLOYMENTS = ("tfserving", "gateway")


def rendered(folder: Path) -> list[dict[str, Any]]:
    return render_kustomization(folder)


def container(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (c,) = find(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"]
    return c


def mount_path(deployment: dict[str, Any], volume_kind: str) -> str:
    """Where the Deployment mounts its volume of ``volume_kind`` (persistentVolumeClaim,
    configMap)."""
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = [v["name"] for v in pod["volumes"] if volume_kind in v]
    (c,) = pod["containers"]
    (path,) = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == volume]
    return str(path)


@pytest.mark.parametrize("folder", kustomizations(), ids=lambda p: p.relative_to(K8S).as_posix())
def test_every_object_validates_strictly(folder: Path) -> None:
    objects = rendered(folder)
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validate_command_accepts_every_rendered_file(tmp_path: Path) -> None:
    """The same check as the CLI a person would run on `kubectl kustomize` output."""
    files = []
    for folder in kustomizations():
        out = tmp_path / (folder.relative_to(K8S).as_posix().replace("/", "-") + ".yaml")
        out.write_text(yaml.safe_dump_all(rendered(folder)))
        files.append(str(out))
    cli = Path(sys.executable).parent / "kubernetes-validate"
    done = subprocess.run(
        [str(cli), "--strict", "--quiet", "-k", KUBERNETES_VERSION, *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_strict_validation_rejects_a_misspelt_field() -> None:
    deployment = find(rendered(BASE), "Deployment", "gateway")
    bad = apply_json6902(
        deployment,
        [{"op": "add", "path": "/spec/template/spec/containers/0/readinesProbe", "value": {}}],
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_renderer_applies_json6902_and_refuses_what_it_cannot_render(tmp_path: Path) -> None:
    doc = {"a": {"b": [1, 2]}, "c~/d": 1}
    ops = [
        {"op": "add", "path": "/a/b/-", "value": 3},
        {"op": "replace", "path": "/a/b/0", "value": 0},
        {"op": "remove", "path": "/c~0~1d"},
        {"op": "add", "path": "/e~1f", "value": "x"},
    ]
    assert apply_json6902(doc, ops) == {"a": {"b": [0, 2, 3]}, "e/f": "x"}
    with pytest.raises(KeyError):
        apply_json6902(doc, [{"op": "replace", "path": "/nope", "value": 1}])
    (tmp_path / "kustomization.yaml").write_text("resources: []\nimages: [{name: x}]\n")
    with pytest.raises(ValueError, match="images"):
        render_kustomization(tmp_path)


def test_deployments_roll_safely_and_run_locked_down() -> None:
    objects = rendered(BASE)
    for name in DEPLOYMENTS:
        deployment = find(objects, "Deployment", name)
        spec = deployment["spec"]
        assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"] == labels
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["enableServiceLinks"] is False
        assert pod["securityContext"]["runAsUser"] > 0
        c = container(objects, name)
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c)
        for kind in ("requests", "limits"):
            assert set(c["resources"][kind]) >= {"cpu", "memory"}, (name, kind)
        # A read-only root needs a writable /tmp (gateway: metrics folder, HOME, cache).
        assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}
        service = find(objects, "Service", name)
        assert service["spec"]["selector"] == labels
        port_names = {p["name"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
        hpa = find(objects, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"]["name"] == name
        # The HPA owns the count: a `replicas` here would be re-applied by every label move.
        assert "replicas" not in spec
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert hpa["spec"]["minReplicas"] >= 2
        pdb = find(objects, "PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"] == labels


@pytest.mark.parametrize("folder", kustomizations(), ids=lambda p: p.relative_to(K8S).as_posix())
def test_disruption_budgets_let_a_node_drain_at_the_autoscalers_floor(folder: Path) -> None:
    """At the HPA's fewest replicas a drain must still be able to evict one pod: the gpu
    overlay's single TF Serving pod under the base's minAvailable: 1 allowed none, and a
    node drain or upgrade waited on it for ever (an outside audit, 12-07)."""
    objects = rendered(folder)
    for name in DEPLOYMENTS:
        floor = find(objects, "HorizontalPodAutoscaler", name)["spec"]["minReplicas"]
        budget = find(objects, "PodDisruptionBudget", name)["spec"]
        if "maxUnavailable" in budget:
            assert "minAvailable" not in budget and budget["maxUnavailable"] >= 1, name
        else:
            assert budget["minAvailable"] < floor, name


@pytest.mark.parametrize("folder", kustomizations(), ids=lambda p: p.relative_to(K8S).as_posix())
def test_a_stopping_tf_serving_pod_outlives_the_gateways_connections_to_it(folder: Path) -> None:
    """tensorflow_model_server ignores SIGTERM: a stopping pod serves until SIGKILL at the
    end of terminationGracePeriodSeconds. The gateways leave it only when its connection
    age (plus gRPC's 10% jitter) sends them a GOAWAY, and their calls then running get the
    age's grace: the kill must come after the preStop, both and a margin. With 30 s
    against a 60 s age, gateways sent batches to a pod killed under them."""
    deployment = find(rendered(folder), "Deployment", "tfserving")
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    channel = dict(
        item.split("=") for item in tfserving_flags(c["args"])["grpc_channel_arguments"].split(",")
    )
    age = int(channel["grpc.max_connection_age_ms"]) / 1000
    grace = int(channel["grpc.max_connection_age_grace_ms"]) / 1000
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 1.1 * age + grace + 2
    # The preStop as an exec: its `sleep` action needs Kubernetes 1.30 or later.
    gateway = container(rendered(folder), "gateway")
    assert "exec" in gateway["lifecycle"]["preStop"]


def test_tf_serving_flags_configs_and_probes() -> None:
    objects = rendered(BASE)
    c = container(objects, "tfserving")
    flags = tfserving_flags(c["args"])
    assert not set(flags) - TFSERVING_FLAGS
    compose = load_compose()["services"]["tfserving"]
    # Everything compose sets, Kubernetes sets too (file paths differ).
    assert set(tfserving_flags(compose["command"])) <= set(flags)
    assert c["command"] == compose["entrypoint"]
    assert c["image"] == compose["image"]
    assert c["image"].split(":")[1].startswith(".".join(tf.__version__.split(".")[:2]) + ".")
    deployment = find(objects, "Deployment", "tfserving")
    config_dir = mount_path(deployment, "configMap")
    config_map = find(objects, "ConfigMap", "cnnserve-models-config")
    for flag, name in TFSERVING_FILE_FLAGS.items():
        assert PurePosixPath(flags[flag]) == PurePosixPath(config_dir, name), flag
        assert name in config_map["data"], name
    # Model AVAILABLE: the command compose's healthcheck runs (tested against a server).
    available = ["bash", "-c", compose["healthcheck"]["test"][-1]]
    assert c["readinessProbe"]["exec"]["command"] == available
    assert c["startupProbe"]["exec"]["command"] == available
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert f"/dev/tcp/127.0.0.1/{ports['http']}" in available[-1]
    assert int(flags["rest_api_port"]) == ports["http"] and int(flags["port"]) == ports["grpc"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == (
        load_monitoring_config(REPOSITORY).prometheus_config.path
    )
    assert int(annotations["prometheus.io/port"]) == ports["http"]


def test_config_map_is_the_repositorys_configs_on_the_model_volume(tmp_path: Path) -> None:
    objects = rendered(BASE)
    data = find(objects, "ConfigMap", "cnnserve-models-config")["data"]
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    k8s_models = load_models_config(tmp_path)
    load_batching_parameters(tmp_path)
    load_monitoring_config(tmp_path)
    for name in ("batching.config", "monitoring.config"):
        assert data[name] == (REPOSITORY / name).read_text(), name
    ours = load_models_config(REPOSITORY)
    model_dirs = {
        mount_path(find(objects, "Deployment", n), "persistentVolumeClaim") for n in DEPLOYMENTS
    }
    (model_dir,) = model_dirs  # the same path in both pods
    assert len(k8s_models.model_config_list.config) == len(ours.model_config_list.config)
    for k8s, local in zip(
        k8s_models.model_config_list.config, ours.model_config_list.config, strict=True
    ):
        # The same model, its folder at <volume>/<name> instead of /models/<name>.
        assert k8s.base_path == f"{model_dir}/{local.name}"
        local.base_path = k8s.base_path
        assert k8s == local


def test_gateway_arguments_variables_and_probes() -> None:
    objects = rendered(BASE)
    c = container(objects, "gateway")
    args = build_parser(Settings()).parse_args(c["args"])
    assert args.command == "serve" and args.backend == "tfserving"
    # The command tests/integration/test_deployment.py runs in front of a TF Serving.
    assert c["args"] == load_compose()["services"]["gateway"]["command"]
    host, port = args.tfserving_address.split(":")
    service = find(objects, "Service", host)
    assert int(port) in {p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert set(env) <= {f"CNNSERVE_{f.upper()}" for f in Settings.model_fields}
    deployment = find(objects, "Deployment", "gateway")
    # models.config comes from the ConfigMap, where TF Serving reads it too.
    assert env["CNNSERVE_MODEL_REPOSITORY"] == mount_path(deployment, "configMap")
    assert int(env["CNNSERVE_WORKERS"]) == int(c["resources"]["requests"]["cpu"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    probes = int(env["CNNSERVE_PROBE_PORT"])
    assert ports == {"http": Settings().port, "grpc": Settings().grpc_port, "probes": probes}
    # Probes and the scrape on the probe port, not queued behind the REST port's
    # connections; and the image has the same one.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == "probes", probe
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == probes
    assert DockerfileParser(str(DOCKERFILE)).envs["CNNSERVE_PROBE_PORT"] == str(probes)


def test_gpu_overlay_puts_tf_serving_on_a_gpu() -> None:
    c = container(rendered(K8S / "overlays" / "gpu"), "tfserving")
    assert c["image"] == container(rendered(BASE), "tfserving")["image"] + "-gpu"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    gateway = container(rendered(K8S / "overlays" / "gpu"), "gateway")
    assert "nvidia.com/gpu" not in gateway["resources"]["limits"]
    # One GPU pod to start with: the HPA's floor, which would otherwise scale it to 2.
    hpa = find(rendered(K8S / "overlays" / "gpu"), "HorizontalPodAutoscaler", "tfserving")
    assert hpa["spec"]["minReplicas"] == 1


def test_request_rate_overlay_scales_on_the_adapters_metric() -> None:
    hpa = find(rendered(K8S / "overlays" / "request-rate"), "HorizontalPodAutoscaler", "gateway")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    values = yaml.safe_load(
        (K8S / "overlays" / "request-rate" / "prometheus-adapter-values.yaml").read_text()
    )
    (rule,) = values["rules"]["custom"]
    series = rule["seriesQuery"].split("{")[0]
    assert series == f"{metrics.REQUESTS._name}_total"
    renamed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
    assert metric["pods"]["metric"]["name"] == renamed


def test_only_gateways_and_prometheus_reach_tf_serving() -> None:
    """TF Serving checks no keys: its NetworkPolicy admits the gateway pods on the gRPC
    port the gateway dials and the monitoring namespace on the metrics port, nothing else."""
    objects = rendered(BASE)
    policy = find(objects, "NetworkPolicy", "tfserving")
    tfserving = find(objects, "Deployment", "tfserving")["spec"]["template"]["metadata"]
    gateway = find(objects, "Deployment", "gateway")["spec"]["template"]["metadata"]
    assert policy["spec"]["podSelector"]["matchLabels"] == tfserving["labels"]
    ports = {p["name"]: p["containerPort"] for p in container(objects, "tfserving")["ports"]}
    rules = {rule["ports"][0]["port"]: rule["from"] for rule in policy["spec"]["ingress"]}
    assert set(rules) == set(ports)
    ((from_gateway,),) = [rules["grpc"]]
    assert from_gateway["podSelector"]["matchLabels"] == gateway["labels"]
    args = build_parser(Settings()).parse_args(container(objects, "gateway")["args"])
    assert int(args.tfserving_address.split(":")[1]) == ports["grpc"]
    annotations = tfserving["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    ((from_monitoring,),) = [rules["http"]]
    assert "namespaceSelector" in from_monitoring
    # Its probes run inside the pod, where the policy does not reach: a kubelet's
    # tcpSocket or httpGet probe comes from the node, which a plugin may apply it to.
    c = container(objects, "tfserving")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(c[probe]) & {"exec", "tcpSocket", "httpGet", "grpc"} == {"exec"}, probe
    assert f"/dev/tcp/127.0.0.1/{ports['grpc']}" in c["livenessProbe"]["exec"]["command"][-1]
