"""Train on a tiny generated dataset through the CLI and check the published version."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from tensorflow_serving.apis import prediction_log_pb2

from service.cli import main
from service.preprocessing import PreprocessSpec, preprocess_bytes
from service.training.config import ArchConfig, TrainConfig
from tests.helpers.images import encode, gradient, write_class_folders

pytestmark = pytest.mark.slow

CARD_KEYS = {
    "labels",
    "signatures",
    "preprocessing",
    "architecture",
    "training",
    "dataset",
    "evaluation",
    "runtimes",
    "command",
    "library_versions",
}


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    data = write_class_folders(root / "data", classes=3, per_class=14)
    args = [
        "train",
        "--dataset",
        str(data),
        "--repository",
        str(root / "repo"),
        "--model-name",
        "tiny",
        "--work-dir",
        str(root / "work"),
        "--width",
        "0.25",
        "--depth",
        "1",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--optimizer",
        "adam",
        "--lr",
        "0.003",
        "--val-fraction",
        "0.2",
        "--test-fraction",
        "0.2",
        "--latency-runs",
        "2",
    ]
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        assert main(args) == 0
    (root / "stderr.txt").write_text(said.getvalue())
    return root / "repo" / "tiny" / "1"


def test_version_folder_layout(published: Path) -> None:
    extra = published / "assets.extra"
    for name in (
        "labels.txt",
        "model_card.json",
        "tf_serving_warmup_requests",
        "model.tflite",
        "confusion_matrix.png",
        "training_curves.png",
    ):
        assert (extra / name).is_file(), name
    assert (published / "saved_model.pb").is_file()
    assert (extra / "labels.txt").read_text().split("\n")[:3] == ["class_0", "class_1", "class_2"]
    assert not list(published.parent.glob(".export-*"))


def test_signatures_match_the_contract(published: Path) -> None:
    loaded = tf.saved_model.load(str(published))
    serving = loaded.signatures["serving_default"]
    (_, inputs) = serving.structured_input_signature
    assert inputs["image"].dtype == tf.uint8 and inputs["image"].shape.as_list() == [
        None,
        224,
        224,
        3,
    ]
    out = serving.structured_outputs["probabilities"]
    assert out.dtype == tf.float32 and out.shape.as_list() == [None, 3]

    pixels = np.stack(
        [preprocess_bytes(encode(gradient(), "PNG"), PreprocessSpec(), max_pixels=10**8)] * 2
    )
    probs = serving(image=tf.constant(pixels))["probabilities"].numpy()
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)

    by_bytes = loaded.signatures["predict_image_bytes"]
    (_, byte_inputs) = by_bytes.structured_input_signature
    assert byte_inputs["image_bytes"].dtype == tf.string
    got = by_bytes(image_bytes=tf.constant([encode(gradient(), "PNG")]))["probabilities"].numpy()
    assert got.shape == (1, 3)
    # TF's decoder/resizer approximates Pillow's: the same class, close probabilities.
    assert np.argmax(got[0]) == np.argmax(probs[0])


def test_warmup_file_is_a_tfrecord_of_prediction_logs(published: Path) -> None:
    path = published / "assets.extra" / "tf_serving_warmup_requests"
    logs = []
    for record in tf.data.TFRecordDataset(str(path)):
        entry = prediction_log_pb2.PredictionLog()
        entry.ParseFromString(record.numpy())
        logs.append(entry)
    assert len(logs) >= 2
    for entry in logs:
        request = entry.predict_log.request
        assert request.model_spec.name == "tiny"
        assert request.model_spec.signature_name in {"serving_default", "predict_image_bytes"}
        # The request must run against the model, as TF Serving does at load time.
        sig = tf.saved_model.load(str(published)).signatures[request.model_spec.signature_name]
        kwargs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        assert "probabilities" in sig(**{k: tf.constant(v) for k, v in kwargs.items()})


def test_model_card_is_complete(published: Path) -> None:
    card = json.loads((published / "assets.extra" / "model_card.json").read_text())
    assert set(card) >= CARD_KEYS
    assert card["labels"] == ["class_0", "class_1", "class_2"]
    assert card["preprocessing"]["resize_method"] == "bilinear"
    assert card["preprocessing"]["normalization"]["formula"] == "x / 127.5 - 1"
    evaluation = card["evaluation"]
    assert set(evaluation["per_class"]) == {"class_0", "class_1", "class_2"}
    matrix = np.array(evaluation["confusion_matrix"]["rows_true_cols_predicted"])
    assert (
        matrix.shape == (3, 3) and matrix.sum() == evaluation["examples"] == card["dataset"]["test"]
    )
    assert set(evaluation["latency_tensorflow"]) >= {"batch_1", "batch_32"}
    assert card["training"]["epochs_run"] == 2
    # The config as run: 3 classes from the data (the config's default, 10, was recorded).
    assert card["training"]["arch"]["num_classes"] == card["architecture"]["num_classes"] == 3
    assert card["dataset"]["train_sha256"] != card["dataset"]["test_sha256"]
    assert card["command"].startswith("cnnserve train --dataset")
    assert card["library_versions"]["tensorflow"].startswith("2.")
    assert card["runtimes"]["litert"]["verified"] is True


def test_litert_artifact_reproduces_the_saved_model(published: Path) -> None:
    runner = Interpreter(
        model_path=str(published / "assets.extra" / "model.tflite")
    ).get_signature_runner("serving_default")
    serving = tf.saved_model.load(str(published)).signatures["serving_default"]
    x = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        runner(image=x)["probabilities"],
        serving(image=tf.constant(x))["probabilities"].numpy(),
        atol=1e-4,
    )


def test_evaluate_reports_on_a_published_version(
    published: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert main(["evaluate", str(published), "--output", str(tmp_path), "--latency-runs", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    card = json.loads((published / "assets.extra" / "model_card.json").read_text())
    assert report["test_split_matches_card"] is True
    assert report["accuracy"] == pytest.approx(card["evaluation"]["accuracy"])
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000
    # The folder moved: --data-dir names it (it only replaced Fashion-MNIST's folder).
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(published.parents[2] / "data", moved)
    assert main(["evaluate", str(published), "--data-dir", str(moved), "--latency-runs", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["test_split_matches_card"] is True
    from service.training.evaluate import card_splits

    tested = card_splits(card, moved).test.paths
    assert tested is not None
    tested[0].unlink()  # changed data: said, not only in the JSON
    with caplog.at_level(logging.WARNING, logger="service.training.evaluate"):
        assert (
            main(["evaluate", str(published), "--data-dir", str(moved), "--latency-runs", "2"]) == 0
        )
    assert json.loads(capsys.readouterr().out)["test_split_matches_card"] is False
    assert "test split differs" in caplog.text


def test_a_rerun_publishes_nothing_new_and_changed_images_a_new_version(
    published: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = published.parents[2]
    args = [
        "train",
        "--dataset",
        str(root / "data"),
        "--repository",
        str(root / "repo"),
        "--model-name",
        "tiny",
        "--work-dir",
        str(root / "work"),
        "--width",
        "0.25",
        "--depth",
        "1",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--optimizer",
        "adam",
        "--lr",
        "0.003",
        "--val-fraction",
        "0.2",
        "--test-fraction",
        "0.2",
        "--latency-runs",
        "2",
    ]
    before = (published / "saved_model.pb").read_bytes()
    capsys.readouterr()
    # The same command again: the finished fit is reused, and it is version 1 already
    # (it used to be published again as an identical version 2).
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(published) and "already published as" in err
    assert sorted(p.name for p in published.parent.iterdir()) == ["1"]
    assert (published / "saved_model.pb").read_bytes() == before
    assert len(list((root / "work").glob("*/history.json"))) == 1
    # The same command on changed images is a new fit: the finished one was reused and
    # published under a card that described the new data.
    extra = root / "data" / "class_0" / "extra.png"
    extra.write_bytes((root / "data" / "class_1" / "1.png").read_bytes())
    try:
        assert main(args) == 0
    finally:
        extra.unlink()
    assert len(list((root / "work").glob("*/history.json"))) == 2
    assert (published.parent / "2" / "saved_model.pb").is_file()


def tiny_fit(data: Path, **changes: Any) -> TrainConfig:
    """A fit of a quarter-width, one-block model on ``data``: seconds, not minutes."""
    base: dict[str, Any] = {
        "dataset": str(data),
        "arch": ArchConfig(width_multiplier=0.25, depth=1),
        "batch_size": 8,
        "optimizer": "adam",
        "val_fraction": 0.25,
    }
    return TrainConfig(**{**base, **changes})


def test_an_interrupted_fit_resumes_with_its_whole_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.training import train as training

    data = write_class_folders(tmp_path / "data", classes=3, per_class=8)
    cfg = tiny_fit(
        data,
        epochs=4,
        learning_rate=0.003,
        early_stopping_patience=10,
        plateau_patience=1,
        test_fraction=0.2,
    )
    seen: list[dict[str, float]] = []
    real = training.ProgressLog.on_epoch_end

    def interrupted(self: keras.callbacks.Callback, epoch: int, logs: dict[str, float]) -> None:
        real(self, epoch, logs)
        seen.append(dict(logs))
        if epoch == 1:  # after epoch 2's backup, as a Ctrl-C in epoch 3 would be
            raise KeyboardInterrupt

    monkeypatch.setattr(training.ProgressLog, "on_epoch_end", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, tmp_path / "work")
    monkeypatch.undo()

    result = training.train(cfg, tmp_path / "work")
    # Before the journal the history began at the resumed epoch (2 of 4 epochs).
    assert len(result.history["loss"]) == 4
    assert result.history["val_loss"][:2] == pytest.approx([s["val_loss"] for s in seen])
    assert result.history["learning_rate"][:2] == pytest.approx([s["learning_rate"] for s in seen])


def test_a_damaged_finished_fit_is_fitted_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A finished fit whose record cannot be read back (a cut-short history.json, a
    truncated final.keras) stopped every later run of the same command with a traceback."""
    from service.training import train as training

    data = write_class_folders(tmp_path / "data", classes=2, per_class=8)
    cfg = tiny_fit(data, epochs=2, test_fraction=0.25)
    caplog.set_level(logging.INFO, logger="service.training.train")
    training.train(cfg, tmp_path / "work")
    (run_dir,) = (tmp_path / "work").iterdir()
    for damaged, text in (("history.json", '{"history": {"lo'), ("final.keras", "PK\x03")):
        (run_dir / damaged).write_text(text)
        caplog.clear()
        result = training.train(cfg, tmp_path / "work")
        assert f"cannot reuse the finished fit in {run_dir}" in caplog.text, damaged
        assert len(result.history["loss"]) == 2
        assert (run_dir / damaged).read_bytes() != text.encode()  # written anew
        assert json.loads((run_dir / "history.json").read_text())["history"]["loss"]
    caplog.clear()
    training.train(cfg, tmp_path / "work")  # the refit's record is reused again
    assert "reusing finished fit" in caplog.text and "cannot reuse" not in caplog.text


def test_a_full_disk_while_publishing_is_one_line_and_no_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """TensorFlow's writes fail with its own ResourceExhaustedError, no OSError: it was a
    traceback (the version stayed unpublished, as it must)."""
    import service.training.export

    def disk_full(model: keras.Model, spec: PreprocessSpec, path: Path) -> None:
        raise tf.errors.ResourceExhaustedError(
            None, None, f"{path}/saved_model.pb; No space left on device"
        )

    monkeypatch.setattr(service.training.export, "write_saved_model", disk_full)
    data = write_class_folders(tmp_path / "data", classes=2, per_class=10)
    repo = tmp_path / "repo"
    code = main(["train", "--dataset", str(data), "--repository", str(repo),
                 "--model-name", "tiny", "--work-dir", str(tmp_path / "work"),
                 "--width", "0.25", "--depth", "1", "--epochs", "1", "--batch-size", "8",
                 "--val-fraction", "0.25", "--test-fraction", "0.25",
                 "--latency-runs", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"cnnserve train: cannot write a version into {repo / 'tiny'}: No space left on "
        "device; free space there or choose another --repository"
    )
    assert list((repo / "tiny").iterdir()) == []  # neither a version nor its temp folder


def test_publish_written_tells_tensorflows_denied_write_as_an_os_error(tmp_path: Path) -> None:
    """The publishing step train and compress share."""
    from service.training.export import publish_written

    def denied(tmp: Path) -> None:
        (tmp / "part").write_text("x")
        raise tf.errors.PermissionDeniedError(None, None, f"{tmp}/x.pb; Permission denied")

    with pytest.raises(OSError, match="Permission denied; allow writing there"):
        publish_written(tmp_path / "m", denied)
    assert list((tmp_path / "m").iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_evaluate_on_a_damaged_variables_shard_is_one_line(
    published: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    """TensorFlow's reader raised IndexError "Read less bytes than requested" (cut
    short) or DataLossError "Checksum does not match" (the same size, other bytes): a
    traceback from the CLI (an outside audit, 12-07)."""
    import shutil

    version = tmp_path / "m" / "1"
    shutil.copytree(published, version)
    shard = next((version / "variables").glob("variables.data-*"))
    data = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    else:
        shard.write_bytes(data[:64] + bytes(len(data) - 64))
    assert main(["evaluate", str(version), "--latency-runs", "1"]) == 2
    err = capsys.readouterr().err
    assert "TensorFlow cannot load the SavedModel" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_evaluate_names_data_dir_when_the_cards_folder_is_gone(
    published: Path, tmp_path: Path
) -> None:
    """The folder a version was trained on moved: "does not exist" alone did not say
    that the path is the card's, nor how to give the new one."""
    from service.errors import DatasetError
    from service.training.evaluate import card_splits

    card = json.loads((published / "assets.extra" / "model_card.json").read_text())
    card["training"]["dataset"] = str(tmp_path / "gone")
    with pytest.raises(DatasetError, match="give --data-dir where it is now"):
        card_splits(card, None)


def test_a_fit_ends_with_its_test_accuracy(published: Path) -> None:
    """The held-out score was only in the card: a fit ended with a folder name."""
    card = json.loads((published / "assets.extra" / "model_card.json").read_text())
    err = (published.parents[2] / "stderr.txt").read_text()
    accuracy = card["evaluation"]["accuracy"]
    assert f"test accuracy {accuracy:.2%} on {card['evaluation']['examples']} held-out" in err
    assert f"cnnserve evaluate {published}" in err


def test_a_version_carries_demo_samples_of_its_test_split(published: Path) -> None:
    """The demo page offered a model trained on a folder only its blank warmup images:
    nothing to try. Publishing writes one test image of each class, with its class."""
    from service.samples import PUBLISHED_ABOUT, samples_for

    card = json.loads((published / "assets.extra" / "model_card.json").read_text())
    found = samples_for(published, card, published / "no-fashion-mnist-here")
    assert sorted(s.label for s in found) == ["class_0", "class_1", "class_2"]
    assert all(s.about == PUBLISHED_ABOUT and s.png.startswith(b"\x89PNG") for s in found)
    assert all(s.source.startswith("test split image ") for s in found)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_train_stopped_mid_fit_exits_at_once(tmp_path: Path, stop: signal.Signals) -> None:
    """Ctrl-C during an epoch printed "interrupted" and then hung for good (freeing the
    fit's tf.data iterators deadlocks in TF); a SIGTERM killed it without the line."""
    command = [
        sys.executable, "-m", "service.cli", "train", "--dataset", "fashion_mnist",
        "--limit", "600", "--repository", str(tmp_path / "repo"),
        "--work-dir", str(tmp_path / "work"), "--model-name", "tiny", "--arch", "lenet5",
        "--epochs", "200", "--patience", "200", "--batch-size", "64", "--latency-runs", "1",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2]
    )
    assert process.stderr is not None
    try:
        ends = []  # when epochs 1 and 2 ended
        for line in process.stderr:
            if line.startswith(("epoch 1/200", "epoch 2/200")):
                ends.append(time.monotonic())
                if len(ends) == 2:
                    break
        else:
            raise AssertionError(f"train ended before its second epoch: {process.wait()}")
        # Half an epoch in, where the fit's input pipeline is busy (at an epoch's end it
        # exited): the moment to stop it, not a synchronization.
        time.sleep((ends[1] - ends[0]) / 2)
        process.send_signal(stop)
        code = process.wait(timeout=60)  # it hung here for good
        rest = process.stderr.read()
        assert code == 130, rest
    finally:
        process.kill()
    assert rest.strip().splitlines()[-1] == (
        "cnnserve train: interrupted; rerun the same command to resume from the last finished epoch"
    )
    assert not list(tmp_path.glob("repo/*/*/saved_model.pb"))  # nothing published
