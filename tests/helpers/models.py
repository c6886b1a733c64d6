"""Tiny real SavedModels in the repository layout, built in seconds for tests.

Each version is an untrained `efficient_cnn` at width 0.25 with its own seed, exported
exactly as training exports (signatures, labels, card, warmup records), so the gateway
sees nothing it would not see in production; only the weights are random.

A test process exports each SavedModel (labels count, seed) once and publishes copies of
it after, each with its own assets.extra: ~0.9 s less per publish, and, since each
export's bytes differ (TensorFlow's SavedModel is not reproducible) while copies are
identical, a server loading a copy finds the LiteRT conversion it cached by the
SavedModel's content (~4 s per load before). The first load of each in a run converts.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
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

# Where exports are kept for copying (tests/conftest.py points it into pytest's own
# temporary folder); None: a temporary folder made on first use.
BUILD_DIR: Path | None = None
_SAVED_MODELS: dict[tuple[Path, int, int], Path] = {}
_LITERT: dict[tuple[Path, int, int], tuple[Path, dict[str, object]]] = {}


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
    """Publish the next version of ``model`` under ``repository``; returns its folder.

    The SavedModel is a copy of this process's one export for these labels' count and
    seed (the module docstring says why); assets.extra is written for this version."""
    labels = labels or ["cat", "dog", "bird"]
    key = (_build_dir(), len(labels), seed)
    saved_model = _saved_model(key)

    def write(tmp: Path) -> None:
        _copy_files(saved_model, tmp)
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
            artifact, info = _litert(key)
            shutil.copyfile(artifact, extra / artifact.name)
            card["runtimes"] = {"litert": copy.deepcopy(info)}
        (extra / "model_card.json").write_text(json.dumps(card))

    return publish_version(repository / model, write)


def _build_dir() -> Path:
    global BUILD_DIR
    if BUILD_DIR is None:
        BUILD_DIR = Path(tempfile.mkdtemp(prefix="tiny-models-"))
    return BUILD_DIR


def _saved_model(key: tuple[Path, int, int]) -> Path:
    """The SavedModel of ``key`` (build folder, classes, seed), exported on first use."""
    folder = _SAVED_MODELS.get(key)
    if folder is None or not folder.is_dir():
        build_dir, classes, seed = key
        folder = build_dir / f"saved-model-{classes}-{seed}"
        shutil.rmtree(folder, ignore_errors=True)
        write_saved_model(tiny_keras_model(classes, seed), SPEC, folder)
        _SAVED_MODELS[key] = folder
    return folder


def _litert(key: tuple[Path, int, int]) -> tuple[Path, dict[str, object]]:
    """The verified LiteRT artifact of ``key``'s SavedModel and its card entry."""
    found = _LITERT.get(key)
    if found is None or not found[0].is_file():
        import numpy as np

        from service.training.evaluate import load_signature
        from service.training.export import convert_litert

        saved_model = _saved_model(key)
        folder = saved_model.with_name(saved_model.name + "-litert")
        folder.mkdir(exist_ok=True)
        samples = np.random.default_rng(key[2]).integers(0, 256, (2, 224, 224, 3), np.uint8)
        artifact = folder / "model.tflite"
        info = convert_litert(saved_model, artifact, load_signature(saved_model), samples)
        found = _LITERT[key] = (artifact, info)
    return found


def _copy_files(source: Path, target: Path) -> None:
    """Copy ``source``'s tree into ``target`` as new files (contents only: fresh mtimes
    and modes, as an export writing them now would leave)."""
    for folder, _, files in os.walk(source):
        into = target / Path(folder).relative_to(source)
        into.mkdir(exist_ok=True)
        for name in files:
            shutil.copyfile(Path(folder) / name, into / name)


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
