"""`cnnserve compress` end to end on a tiny generated dataset: int8, prune and distill
each publish a servable next version whose card carries size, accuracy and throughput;
the gateway serves a quantized version (and says so) and refuses one that drifted."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from service.cli import main
from tests.helpers.cli import cnnserve
from tests.helpers.images import encode, gradient, write_class_folders
from tests.helpers.models import simple_config, write_models_config
from tests.helpers.server import Server

pytestmark = pytest.mark.slow

FIGURES = ("size_ratio", "accuracy_delta", "throughput_ratio_batch_1", "throughput_ratio_batch_32")


def tree_digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def card(version_dir: Path) -> dict[str, Any]:
    return json.loads((version_dir / "assets.extra" / "model_card.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 1: LeNet-5 trained with RAdam through `cnnserve train` (both new paths)."""
    root = tmp_path_factory.mktemp("compress")
    data = write_class_folders(root / "data", classes=3, per_class=14)
    args = ["train", "--dataset", str(data), "--repository", str(root / "repo")]
    args += ["--model-name", "tiny", "--work-dir", str(root / "work"), "--arch", "lenet5"]
    args += ["--optimizer", "radam", "--lr", "0.003", "--epochs", "2", "--batch-size", "8"]
    args += ["--val-fraction", "0.2", "--test-fraction", "0.2", "--latency-runs", "2"]
    assert main(args) == 0
    version = root / "repo" / "tiny" / "1"
    assert card(version)["architecture"]["name"] == "lenet5"
    assert card(version)["training"]["optimizer"] == "radam"
    assert card(version)["evaluation"]["mean_average_precision"] is not None
    write_models_config(root / "repo", simple_config("tiny", policy="all {}"))
    SOURCE_DIGEST.update(tree_digest(version))
    return root / "repo"


SOURCE_DIGEST: dict[str, bytes] = {}


def compress(repo: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[Path, str]:
    args = ["compress", "--model-repository", str(repo), "--model", "tiny", "--version", "1"]
    assert main([*args, "--latency-runs", "2", *extra]) == 0
    out = capsys.readouterr().out
    return Path(out.strip().splitlines()[-1]), out


def check_figures(version_dir: Path, method: str, out: str) -> dict[str, Any]:
    record = card(version_dir)
    compression = record["compression"]
    assert compression["method"] == method and compression["source_version"] == 1
    for key in FIGURES:
        assert isinstance(compression[key], float), key
    assert compression["size_ratio"] > 0 and compression["throughput_ratio_batch_32"] > 0
    for line in ("size", "accuracy", "batch 1", "batch 32"):
        assert f"  {line}" in out
    assert record["command"].startswith("cnnserve compress --model-repository")
    artifact = version_dir / "assets.extra" / record["runtimes"]["litert"]["file"]
    assert artifact.stat().st_size == record["compression"]["after"]["bytes"]
    assert (version_dir / "saved_model.pb").is_file()
    assert (version_dir / "assets.extra" / "labels.txt").is_file()
    return record


@pytest.fixture(scope="module")
def int8_version(repo: Path) -> Path:
    # A 2-epoch model on 42 images has near-tied classes, so int8 may flip a few argmaxes:
    # the test states lenient thresholds and checks they are what the card records.
    args = ["compress", "--model-repository", str(repo), "--model", "tiny", "--version", "1"]
    args += ["--method", "int8", "--latency-runs", "2", "--representative-samples", "16"]
    args += ["--min-agreement", "0.5", "--max-accuracy-drop", "0.5"]
    assert main(args) == 0
    return max(
        (p for p in (repo / "tiny").iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )


def test_int8_publishes_a_quantized_version(int8_version: Path, repo: Path) -> None:
    record = card(int8_version)
    compression = record["compression"]
    assert compression["method"] == "int8" and compression["size_ratio"] > 2
    litert = record["runtimes"]["litert"]
    assert litert["precision"] == "int8" and litert["file"] == "model_int8.tflite"
    assert litert["thresholds"] == {"min_top1_agreement": 0.5, "max_accuracy_drop": 0.5}
    assert litert["top1_agreement"] >= 0.5
    # The artifact really is integer: uint8 input, int8 weights, float32 probabilities out.
    interpreter = Interpreter(model_path=str(int8_version / "assets.extra" / litert["file"]))
    runner = interpreter.get_signature_runner("serving_default")
    assert runner.get_input_details()["image"]["dtype"] == np.uint8
    assert any(d["dtype"] == np.int8 for d in interpreter.get_tensor_details())
    # The SavedModel TF Serving loads is the float model it was made from, unchanged.
    source = repo / "tiny" / "1"
    assert (int8_version / "saved_model.pb").read_bytes() == (
        source / "saved_model.pb"
    ).read_bytes()
    for key in FIGURES:
        assert isinstance(compression[key], float)


def test_evaluate_scores_the_quantized_artifact_the_gateway_serves(
    int8_version: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An int8 version keeps its source's float SavedModel beside model_int8.tflite:
    evaluate scored that, and reported the source's figures as the int8 version's."""
    capsys.readouterr()
    assert main(["evaluate", str(int8_version), "--latency-runs", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    measured = card(int8_version)["evaluation"]  # compress measured the int8 artifact
    assert report["runtime"] == "litert int8"
    assert report["test_split_matches_card"] is True
    # Every figure as measured on the artifact (mAP shows int8's coarser score steps).
    shared = sorted(k for k, v in measured.items() if isinstance(v, float) and k in report)
    assert shared and {k: report[k] for k in shared} == {k: measured[k] for k in shared}


def test_evaluate_refuses_an_artifact_the_gateway_would_refuse(
    int8_version: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A damaged model_int8.tflite is not served (the card's sha256): evaluate says so
    rather than scoring the float SavedModel beside it as the version."""
    copy = tmp_path / "2"
    shutil.copytree(int8_version, copy)
    artifact = copy / "assets.extra" / "model_int8.tflite"
    data = artifact.read_bytes()
    artifact.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    capsys.readouterr()
    assert main(["evaluate", str(copy), "--latency-runs", "2"]) == 2
    assert "refusing to serve it" in capsys.readouterr().err


def test_prune_reaches_its_sparsity_and_reports(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version, out = compress(repo, capsys, "--method", "prune", "--sparsity", "0.5", "--epochs", "2")
    record = check_figures(version, "prune", out)
    assert record["compression"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "sparsity" in out and record["runtimes"]["litert"]["precision"] == "float32"
    # Zeros compress: the gzip'd artifact shrinks though the flatbuffer does not.
    assert record["compression"]["gzip_size_ratio"] > 1.2
    assert "speed_note" in record["compression"]


def test_distill_reports_the_student_next_to_its_baseline(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version, out = compress(
        repo, capsys, "--method", "distill", "--teacher", "1", "--student-arch", "efficient_cnn",
        "--student-width", "0.25", "--epochs", "1", "--batch-size", "8",
    )  # fmt: skip
    record = check_figures(version, "distill", out)
    compression = record["compression"]
    assert compression["teacher_version"] == 1
    assert 0 <= compression["student_without_teacher_accuracy"] <= 1
    assert compression["student_accuracy"] == record["evaluation"]["accuracy"]
    assert record["architecture"]["name"] == "efficient_cnn"
    assert "trained alone" in out


def test_a_teacher_of_other_classes_is_refused(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its outputs would be read as the source's classes: the student learns wrong labels."""
    other = tmp_path / "repo"
    shutil.copytree(repo, other)
    teacher = other / "tiny" / "9"
    shutil.copytree(other / "tiny" / "1", teacher)
    card_path = teacher / "assets.extra" / "model_card.json"
    record = json.loads(card_path.read_text())
    record["labels"] = list(reversed(record["labels"]))
    card_path.write_text(json.dumps(record))
    args = ["compress", "--model-repository", str(other), "--model", "tiny", "--version", "1"]
    code = main([*args, "--method", "distill", "--teacher", "9", "--epochs", "1"])
    assert code != 0 and "other classes" in capsys.readouterr().err


def test_the_source_version_was_never_modified(repo: Path, int8_version: Path) -> None:
    assert SOURCE_DIGEST and tree_digest(repo / "tiny" / "1") == SOURCE_DIGEST
    assert not list((repo / "tiny").glob(".export-*"))


def _statuses(client: httpx.Client, model: str) -> dict[str, Any]:
    body = client.get(f"/v1/models/{model}").json()
    return {s["version"]: s for s in body["model_version_status"]}


def test_gateway_serves_the_quantized_version_and_says_so(
    int8_version: Path, tmp_path: Path, start_server: Callable[..., Server]
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(int8_version, repo / "q" / "1")
    write_models_config(repo, simple_config("q"))
    server = start_server(repo)
    with server.client() as client:
        r = client.post(
            "/v1/classify", content=encode(gradient(), "PNG"), headers={"content-type": "image/png"}
        )
        assert r.status_code == 200 and r.json()["version"] == 1
        metrics = client.get("/metrics").text
    assert (
        'cnnserve_model_runtime_info{model="q",precision="int8",runtime="litert",version="1"} 1.0'
        in metrics
    )
    log = server.log.read_text()
    assert "q version 1 is available (litert runtime, int8)" in log


def test_verify_compares_a_quantized_version_with_the_artifact_that_serves(
    int8_version: Path, tmp_path: Path, start_server: Callable[..., Server]
) -> None:
    """The offline side of `cnnserve verify` is the int8 artifact the gateway serves, not
    the float SavedModel (whose answers differ by int8's rounding: a healthy int8
    version agreed 99.2% and failed the 99.9% gate as "skew")."""
    repo = tmp_path / "repo"
    shutil.copytree(int8_version, repo / "q" / "1")
    write_models_config(repo, simple_config("q"))
    server = start_server(repo)
    data = write_class_folders(tmp_path / "images", classes=3, per_class=8)
    args = ["verify", "--url", server.url, "--model-repository", str(repo), "--data", str(data)]
    done = cnnserve(*args, "--output", str(tmp_path / "report"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "offline model: its int8 LiteRT artifact" in done.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["encodings"]["png"]["agreement"] == 1.0

    # Without --data: the version's own test split, rebuilt from the folder its card
    # records. It used to send Fashion-MNIST's images, of no class this model knows.
    args = ["verify", "--url", server.url, "--model-repository", str(repo)]
    done = cnnserve(*args, "--output", str(tmp_path / "own"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify: test images: this version's test split of " in done.stderr
    report = json.loads((tmp_path / "own" / "report.json").read_text())
    recorded = card(repo / "q" / "1")
    assert report["images"] == recorded["dataset"]["test"] > 0
    assert report["accuracy_offline"] is not None
    assert report["encodings"]["png"]["agreement"] == 1.0
    # Its folder gone: one line and exit 2 ("cannot check"), not a traceback or a skew.
    damaged = tmp_path / "damaged"
    shutil.copytree(repo, damaged)
    edited = card(damaged / "q" / "1")
    edited["training"]["dataset"] = str(tmp_path / "gone")
    (damaged / "q" / "1" / "assets.extra" / "model_card.json").write_text(json.dumps(edited))
    args = ["verify", "--url", server.url, "--model-repository", str(damaged)]
    done = cnnserve(*args, "--output", str(tmp_path / "gone-report"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"cnnserve verify: this version was tested on images from {tmp_path / 'gone'}, which "
        "is not a folder here (its model card's record); give --data a folder of images of "
        "its classes"
    )


def test_gateway_refuses_a_quantized_version_that_drifted(
    int8_version: Path, tmp_path: Path, start_server: Callable[..., Server]
) -> None:
    repo = tmp_path / "repo"
    version = repo / "q" / "1"
    shutil.copytree(int8_version, version)
    # The card now states a threshold its measured agreement does not meet.
    record = card(version)
    record["runtimes"]["litert"]["thresholds"]["min_top1_agreement"] = 1.01
    (version / "assets.extra" / "model_card.json").write_text(json.dumps(record))
    write_models_config(repo, simple_config("q"))
    server = start_server(repo, wait_ready=False)
    with server.client() as client:
        deadline = time.monotonic() + 60
        while (status := _statuses(client, "q").get("1", {})).get("state") != "END":
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert "refusing to serve it" in status["status"]["error_message"]
        assert "top-1" in status["status"]["error_message"]
        assert client.get("/readyz").status_code == 503
        assert "cnnserve_model_runtime_info{" not in client.get("/metrics").text


def test_int8_on_a_damaged_savedmodel_is_one_line(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The conversion runs in a child process, whose whole traceback (~20 lines) was the
    error; its last line says why."""
    damaged = tmp_path / "repo"
    shutil.copytree(repo / "tiny" / "1", damaged / "tiny" / "1")
    (damaged / "tiny" / "1" / "saved_model.pb").write_bytes(b"garbage")
    args = ["compress", "--model-repository", str(damaged), "--model", "tiny", "--method", "int8"]
    assert main([*args, "--test-limit", "2", "--latency-runs", "1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"cnnserve: export_failed: int8 conversion of {damaged / 'tiny' / '1'}")
    assert err.strip().endswith("Wire format was corrupt.")
    assert sorted(p.name for p in (damaged / "tiny").iterdir()) == ["1"]  # nothing published
