"""The committed repository configs parse with TF Serving's own messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.errors import ConfigError
from service.repository import (
    load_batching_parameters,
    load_models_config,
    load_monitoring_config,
    resolve_base_path,
)

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def test_models_config_parses_with_model_server_config() -> None:
    config = load_models_config(REPOSITORY)
    models = {c.name: c for c in config.model_config_list.config}
    assert "fashion_mnist" in models
    fmnist = models["fashion_mnist"]
    assert fmnist.model_platform == "tensorflow"
    assert fmnist.base_path == "/models/fashion_mnist"
    assert fmnist.model_version_policy.WhichOneof("policy_choice") == "latest"
    assert resolve_base_path(REPOSITORY, "fashion_mnist", fmnist.base_path) == (
        REPOSITORY / "fashion_mnist"
    )


def test_batching_config_matches_tf_serving_fields() -> None:
    params = load_batching_parameters(REPOSITORY)
    assert params.max_batch_size.value == 32
    assert params.batch_timeout_micros.value >= 0
    assert params.max_enqueued_batches.value >= 1
    assert params.num_batch_threads.value >= 1
    # TF Serving requires allowed sizes increasing and ending at max_batch_size.
    sizes = list(params.allowed_batch_sizes)
    assert sizes == sorted(sizes) and sizes[-1] == params.max_batch_size.value


def test_monitoring_config() -> None:
    config = load_monitoring_config(REPOSITORY)
    assert config.prometheus_config.enable
    assert config.prometheus_config.path == "/monitoring/prometheus/metrics"


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("batching.config", "max_batch_sise { value: 32 }\n"),
        ("batching.config", "max_batch_size: 32\n"),  # a wrapper message, not a scalar
        ("monitoring.config", "prometheus_config { enable: yes_please }\n"),
        ("models.config", "model_config_list { config { name: 'a' base_pth: '/models/a' } }\n"),
    ],
)
def test_a_typo_fails(tmp_path: Path, name: str, bad: str) -> None:
    shutil.copytree(REPOSITORY, tmp_path / "repo", ignore=shutil.ignore_patterns("[0-9]*"))
    (tmp_path / "repo" / name).write_text(bad)
    loader = {
        "batching.config": load_batching_parameters,
        "monitoring.config": load_monitoring_config,
        "models.config": load_models_config,
    }[name]
    with pytest.raises(ConfigError, match=name):
        loader(tmp_path / "repo")


@pytest.mark.parametrize(
    ("base_path", "expected"),
    [
        ("/models/m", "repo/m"),
        ("/models/other", "repo/other"),
        ("rel/m", "repo/rel/m"),
        ("/srv/m", "/srv/m"),
    ],
)
def test_base_path_resolution(base_path: str, expected: str) -> None:
    assert resolve_base_path(Path("repo"), "m", base_path) == Path(expected)
