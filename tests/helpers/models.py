"""Tiny real SavedModels in the repository layout, built in seconds for tests.

Each version is an untrained `efficient_cnn` at width 0.25 with its own seed, exported
exactly as training exports (signatures, labels, card, warmup records), so the gateway
sees nothing it would not see in production; only the weights are random.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras

from service.contract import BYTES_SIGNATURE, SERVING_SIGNATURE
from service.preprocessing import PreprocessSpec
from service.publishing import publish_version
from service.training.architectures import NORMALIZATION, build
from service.training.config import ArchConfig
from service.training.export import (
    warmup_records,
    write_saved_model,
    write_warmup,
)

SPEC = PreprocessSpec()


def tiny_keras_model(num_classes: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return build(ArchConfig(num_classes=num_classes, width_multiplier=0.25, depth=1, dropout=0.0))


def publish_tiny(
    repository: Path,
    model: str,
    *,
    labels: list[str] | None = None,
    seed: int = 0,
    with_labels_file: bool = True,
    with_litert: bool = False,
) -> Path:
    """Publish the next version of ``model`` under ``repository``; returns its folder."""
    labels = labels or ["cat", "dog", "bird"]
    net = tiny_keras_model(len(labels), seed)

    def write(tmp: Path) -> None:
        write_saved_model(net, SPEC, tmp)
        extra = tmp / "assets.extra"
        extra.mkdir()
        if with_labels_file:
            (extra / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
        write_warmup(extra / "tf_serving_warmup_requests", warmup_records(model, SPEC))
        card = {
            "name": model,
            "labels": labels,
            "preprocessing": {**SPEC.to_card(), "normalization": NORMALIZATION},
            "signatures": {SERVING_SIGNATURE: {}, BYTES_SIGNATURE: {}},
            "seed": seed,
        }
        if with_litert:
            import numpy as np

            from service.training.evaluate import load_signature
            from service.training.export import convert_litert

            samples = np.random.default_rng(seed).integers(0, 256, (2, 224, 224, 3), np.uint8)
            card["runtimes"] = {
                "litert": convert_litert(tmp, extra / "model.tflite", load_signature(tmp), samples)
            }
        (extra / "model_card.json").write_text(json.dumps(card))

    return publish_version(repository / model, write)


def write_models_config(repository: Path, body: str) -> None:
    """Write models.config; ``body`` is the inside of model_config_list { ... }."""
    repository.mkdir(parents=True, exist_ok=True)
    (repository / "models.config").write_text(f"model_config_list {{\n{body}\n}}\n")


def simple_config(
    *names: str, policy: str = "latest { num_versions: 1 }", labels: dict[str, int] | None = None
) -> str:
    label_text = "".join(
        f' version_labels {{ key: "{k}" value: {v} }}' for k, v in (labels or {}).items()
    )
    return "\n".join(
        f'config {{ name: "{n}" base_path: "/models/{n}" model_platform: "tensorflow" '
        f"model_version_policy {{ {policy} }}{label_text} }}"
        for n in names
    )


def tiny_repository(root: Path, *, with_litert: bool = False) -> Path:
    """A repository serving one published version of model "tiny" (labels cat, dog,
    bird): what most server tests need."""
    repo = root / "repo"
    publish_tiny(repo, "tiny", with_litert=with_litert)
    write_models_config(repo, simple_config("tiny"))
    return repo
