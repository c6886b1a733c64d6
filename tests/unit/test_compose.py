"""docker/compose.yaml: valid for the compose spec, every file it names exists, TF Serving
gets only flags TF Serving defines and configs that parse with its protos, the gateway
gets arguments and variables `cnnserve serve` reads, and the profiles hold what they say.
(Its healthchecks are run against a real server in tests/integration/test_deployment.py.)"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import tensorflow as tf
import yaml

from service.cli import build_parser
from service.config import Settings
from service.repository import (
    load_batching_parameters,
    load_models_config,
    load_monitoring_config,
)
from tests.helpers.deployment import (
    DOCKER,
    REPOSITORY,
    TFSERVING_FILE_FLAGS,
    TFSERVING_FLAGS,
    load_compose,
    tfserving_flags,
)

LOADERS = {
    "models.config": load_models_config,
    "batching.config": load_batching_parameters,
    "monitoring.config": load_monitoring_config,
}
# Flags the issue asks the stack to set, each one defined by TF Serving.
REQUIRED_TFSERVING_FLAGS = {
    "port",
    "rest_api_port",
    "model_config_file",
    "model_config_file_poll_wait_seconds",
    "file_system_poll_wait_seconds",
    "enable_batching",
    "batching_parameters_file",
    "monitoring_config_file",
    "enable_model_warmup",
    # A models.config with version labels must not stop TF Serving's start-up.
    "allow_version_labels_for_unavailable_models",
}


def compose_schema() -> dict[str, Any]:
    """The compose-spec JSON schema (Apache-2.0) as check-jsonschema ships it."""
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


def validate(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    cls(schema).validate(compose)


def services(compose: dict[str, Any], image: str) -> dict[str, dict[str, Any]]:
    return {
        name: svc for name, svc in compose["services"].items() if svc["image"].startswith(image)
    }


def tfserving_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return services(compose, "tensorflow/serving:")


def gateway_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts (relative to docker/)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (DOCKER / source).resolve()
    return out


def host_path(service: dict[str, Any], container_path: str) -> Path:
    path = PurePosixPath(container_path)
    for target, source in mounts(service).items():
        if path.is_relative_to(target):
            return source / path.relative_to(target)
    raise AssertionError(f"{container_path} is on no bind mount of the service")


def published(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> host address:port of the service's published ports."""
    out = {}
    for spec in service.get("ports", []):
        host, _, container = spec.rpartition(":")
        out[int(container)] = host
    return out


def test_compose_file_is_valid_for_the_compose_spec() -> None:
    validate(load_compose())


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["services"]["gateway"].update(helthcheck={"test": ["CMD", "true"]}),
        lambda c: c["services"]["tfserving"].update(depends_on={"gateway": {"when": "up"}}),
        lambda c: c["services"]["tfserving-gpu"]["deploy"]["resources"].update(gpus=1),
    ],
    ids=["misspelt key", "bad depends_on condition", "unknown resources key"],
)
def test_the_schema_check_catches_mistakes(mutate: Any) -> None:
    compose = copy.deepcopy(load_compose())
    mutate(compose)
    with pytest.raises(jsonschema.ValidationError):
        validate(compose)


def test_every_file_the_stack_names_exists() -> None:
    compose = load_compose()
    for name, service in compose["services"].items():
        for target, source in mounts(service).items():
            assert source.exists(), f"{name} mounts {source} at {target}: missing"
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
            assert (context / ".dockerignore").is_file(), name


def test_profiles() -> None:
    compose = load_compose()
    by_profile: dict[str, set[str]] = {}
    for name, service in compose["services"].items():
        for profile in service.get("profiles", [""]):
            by_profile.setdefault(profile, set()).add(name)
    tfserving = set(tfserving_services(compose))
    # Without a profile: the monitoring half alone (for a gateway run with `make run`).
    assert by_profile[""] == {"prometheus", "grafana"}
    assert by_profile["tfserving"] == {"tfserving", "gateway"}
    assert by_profile["gpu"] == {"tfserving-gpu", "gateway-gpu"}
    assert by_profile["embedded"] == {"gateway-embedded"}
    assert not by_profile["embedded"] & tfserving
    gpu = compose["services"]["tfserving-gpu"]
    assert gpu["image"] == compose["services"]["tfserving"]["image"] + "-gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"


def test_tf_serving_image_matches_our_tensorflow() -> None:
    major_minor = ".".join(tf.__version__.split(".")[:2])
    for name, service in tfserving_services(load_compose()).items():
        tag = service["image"].split(":")[1]
        assert tag.startswith(major_minor + "."), f"{name}: {tag} vs TensorFlow {tf.__version__}"
        assert re.fullmatch(r"\d+\.\d+\.\d+(-gpu)?", tag), f"{name}: pin a release, not {tag}"


@pytest.mark.parametrize("name", ["tfserving", "tfserving-gpu"])
def test_tf_serving_flags_are_tf_servings_and_its_configs_parse(name: str) -> None:
    service = load_compose()["services"][name]
    assert service["entrypoint"] == ["/usr/bin/tensorflow_model_server"]
    flags = tfserving_flags(service["command"])
    unknown = set(flags) - TFSERVING_FLAGS
    assert not unknown, f"TF Serving defines no flag {unknown}"
    assert set(flags) >= REQUIRED_TFSERVING_FLAGS
    assert flags["enable_batching"] == flags["enable_model_warmup"] == "true"
    assert flags["allow_version_labels_for_unavailable_models"] == "true"
    for flag, expected in TFSERVING_FILE_FLAGS.items():
        path = host_path(service, flags[flag])
        assert path.name == expected and path.parent == REPOSITORY, (flag, path)
        LOADERS[expected](path.parent)  # raises on anything TF Serving would refuse
    # base_path /models/<name> is where the repository is mounted.
    for config in load_models_config(REPOSITORY).model_config_list.config:
        assert host_path(service, config.base_path).is_dir(), config.base_path
    assert "/models" in {t for t, _ in mounts(service).items()}
    assert all(v.endswith(":ro") for v in service["volumes"] if v.startswith("."))


def test_tf_serving_ports_match_prometheus_and_the_healthcheck() -> None:
    compose = load_compose()
    service = compose["services"]["tfserving"]
    flags = tfserving_flags(service["command"])
    rest = int(flags["rest_api_port"])
    assert published(service)[rest] == "127.0.0.1:" + str(rest)
    prometheus = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    assert jobs["tfserving"]["static_configs"][0]["targets"] == [f"127.0.0.1:{rest}"]
    assert jobs["tfserving"]["metrics_path"] == (
        load_monitoring_config(REPOSITORY).prometheus_config.path
    )
    check = service["healthcheck"]["test"][-1]
    first_model = load_models_config(REPOSITORY).model_config_list.config[0].name
    assert f"/dev/tcp/127.0.0.1/{rest}" in check
    assert f"GET /v1/models/{first_model} " in check


@pytest.mark.parametrize("name", ["gateway", "gateway-embedded", "gateway-gpu"])
def test_gateway_arguments_and_variables_are_ones_cnnserve_reads(name: str) -> None:
    compose = load_compose()
    service = compose["services"][name]
    args = build_parser(Settings()).parse_args(service["command"])
    assert args.command == "serve"
    fields = {f"CNNSERVE_{f.upper()}" for f in Settings.model_fields}
    assert set(service["environment"]) <= fields
    # Docker's SIGKILL after the gateway's own grace (and its delay before it) has passed.
    settings = Settings(
        **{k[len("CNNSERVE_") :].lower(): v for k, v in service["environment"].items()}
    )
    stop = service["stop_grace_period"]
    assert stop.endswith("s") and float(stop[:-1]) >= (
        settings.shutdown_delay_seconds + settings.shutdown_grace_seconds + 5
    )
    assert host_path(service, "/models") == REPOSITORY  # the image's CNNSERVE_MODEL_REPOSITORY
    gateway = load_compose()["services"]["gateway"]
    assert (
        published(service)
        == published(gateway)
        == {
            8000: "127.0.0.1:8000",
            8500: "127.0.0.1:8500",
            8002: "127.0.0.1:8002",  # the image's CNNSERVE_PROBE_PORT
        }
    )
    if args.backend == "tfserving":
        host, port = args.tfserving_address.split(":")
        (dependency,) = service["depends_on"]
        assert service["depends_on"][dependency] == {"condition": "service_healthy"}
        backend = compose["services"][dependency]
        names = {dependency, *backend.get("networks", {}).get("default", {}).get("aliases", [])}
        assert host in names
        assert tfserving_flags(backend["command"])["port"] == port
    else:
        assert name == "gateway-embedded" and "depends_on" not in service
