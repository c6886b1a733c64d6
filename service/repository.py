"""The model repository on disk: TF Serving's config files and version folders.

Only reading happens here; what is loaded in memory lives in the registry.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import TypeVar, cast

from google.protobuf import message, text_format
from tensorflow_serving.config import model_server_config_pb2

from service.errors import CnnserveError
from service.proto_gen import tfserving_config_pb2

MODELS_CONFIG = "models.config"
BATCHING_CONFIG = "batching.config"
MONITORING_CONFIG = "monitoring.config"

M = TypeVar("M", bound=message.Message)


class ConfigError(CnnserveError):
    """A repository config file that TF Serving would refuse too."""

    code = "invalid_config"


def parse_text_proto(path: Path, message_type: type[M]) -> M:
    """Parse a text-protobuf file strictly: unknown fields and wrong types fail."""
    try:
        return cast(M, text_format.Parse(path.read_text(), message_type()))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_models_config(repository: Path) -> model_server_config_pb2.ModelServerConfig:
    config = parse_text_proto(repository / MODELS_CONFIG, model_server_config_pb2.ModelServerConfig)
    if config.WhichOneof("config") != "model_config_list":
        raise ConfigError(f"{repository / MODELS_CONFIG}: needs a model_config_list")
    names = [c.name for c in config.model_config_list.config]
    if not names or len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"{repository / MODELS_CONFIG}: model names must be unique and non-empty")
    return config


def load_batching_parameters(repository: Path) -> tfserving_config_pb2.BatchingParameters:
    return parse_text_proto(repository / BATCHING_CONFIG, tfserving_config_pb2.BatchingParameters)


def load_monitoring_config(repository: Path) -> tfserving_config_pb2.MonitoringConfig:
    return parse_text_proto(repository / MONITORING_CONFIG, tfserving_config_pb2.MonitoringConfig)


def resolve_base_path(repository: Path, name: str, base_path: str) -> Path:
    """`/models/<name>` (written for the TF Serving container) means `<repository>/<name>`;
    other absolute paths are used as they are, relative ones are repository-relative."""
    posix = PurePosixPath(base_path)
    if base_path in ("", f"/models/{name}") or (
        posix.is_absolute() and posix.parts[:2] == ("/", "models")
    ):
        return repository / (posix.name or name)
    path = Path(base_path)
    return path if path.is_absolute() else repository / path


def version_dirs(model_dir: Path) -> dict[int, Path]:
    """Published versions: positive integer folder names (temp folders are hidden)."""
    if not model_dir.is_dir():
        return {}
    return {
        int(p.name): p
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and int(p.name) > 0
    }
