from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.cli import build_parser, main
from service.config import Settings
from service.logs import setup_logging

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_subcommands_without_importing_tensorflow() -> None:
    code = (
        "import sys\n"
        "from service.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'tensorflow' not in sys.modules, 'help imported TensorFlow'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for command in ("train", "evaluate", "serve", "data", "experiments"):
        assert command in out.stdout


@pytest.mark.parametrize("command", ["train", "evaluate", "serve", "data audit", "experiments"])
def test_each_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command.split(), "--help"])
    assert info.value.code == 0
    assert "usage: cnnserve " + command in capsys.readouterr().out


def test_dataset_repeats_to_merge_sources() -> None:
    args = build_parser(Settings()).parse_args(["train", "--dataset", "a", "--dataset", "b"])
    assert args.dataset == ["a", "b"]
    assert build_parser(Settings()).parse_args(["train"]).dataset is None  # fashion_mnist


def test_train_takes_the_repository_as_every_command_spells_it(tmp_path: Path) -> None:
    """--model-repository, as serve, promote, verify and compress take it (train's
    --repository alone made a user who copied one command's flag into another fail)."""
    parser = build_parser(Settings())
    for flag in ("--repository", "--model-repository"):
        args = parser.parse_args(["train", flag, str(tmp_path)])
        assert Path(args.repository) == tmp_path


def test_architecture_names_match_the_registry() -> None:
    from service.training.architectures import ARCHITECTURES
    from service.training.config import ARCHITECTURE_NAMES

    assert sorted(ARCHITECTURE_NAMES) == sorted(ARCHITECTURES)


def test_missing_dataset_is_a_clear_cli_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "train",
            "--data-dir",
            str(tmp_path),
            "--work-dir",
            str(tmp_path / "w"),
            "--repository",
            str(tmp_path / "r"),
            "--epochs",
            "1",
        ]
    )
    assert code == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["train --epochs 1 --model-name shoes --dataset", "data audit"])
def test_a_corrupt_image_in_a_folder_dataset_stops_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    from tests.helpers.images import write_class_folders

    root = write_class_folders(tmp_path / "data", classes=2, per_class=4)
    (root / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    where = ["--output", str(tmp_path / "out")] if command.startswith("data") else []
    where = where or ["--work-dir", str(tmp_path / "w"), "--repository", str(tmp_path / "r")]
    code = main([*command.split(), str(root), *where])
    err = capsys.readouterr().err
    assert code == 2
    assert f"1 of the 9 files in {root} are not images" in err
    assert str(root / "class_1" / "broken.jpg") in err and "Traceback" not in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNSERVE_PORT", "9001")
    monkeypatch.setenv("CNNSERVE_MAX_BATCH_SIZE", "8")
    settings = Settings()
    assert settings.port == 9001 and settings.max_batch_size == 8
    parser = build_parser(settings)
    assert parser.parse_args(["serve"]).port == 9001


def test_settings_refuse_unsafe_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNSERVE_GRPC_PORT", "8000")
    with pytest.raises(ValidationError, match="pick two ports"):
        Settings()
    monkeypatch.delenv("CNNSERVE_GRPC_PORT")
    with pytest.raises(ValidationError):
        Settings(max_batch_size=0)
    # An infinite timeout served every request without a deadline 400 (the client's
    # fault), or turned the slow-client protection off.
    for name in ("request_timeout_seconds", "header_read_timeout_seconds", "poll_seconds"):
        for value in ("inf", "nan", "-inf"):
            monkeypatch.setenv(f"CNNSERVE_{name.upper()}", value)
            with pytest.raises(ValidationError, match="finite number"):
                Settings()
        monkeypatch.delenv(f"CNNSERVE_{name.upper()}")
    # gRPC's message limit is a C int: this failed start-up with an OverflowError.
    with pytest.raises(ValidationError, match="past the 2147483647 gRPC allows"):
        Settings(max_images_per_request=4000)
    assert Settings(max_images_per_request=3000).grpc_max_message_bytes < 2**31


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """Capture the settings `cnnserve serve` would serve with, instead of serving."""
    import service.server

    seen: list[Settings] = []
    monkeypatch.setattr(service.server, "serve", lambda s: seen.append(s) or 0)
    return seen


def test_serve_flags_are_validated_like_the_environment(
    served: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--workers", "0"]) == 0  # 0 = one per core, resolved, not 0
    assert 1 <= served[0].workers <= 8 and served[0].inference_threads >= 1
    assert main(["serve", "--workers", "3", "--port", "9001"]) == 0
    assert (served[1].workers, served[1].port) == (3, 9001)

    assert main(["serve", "--port", "9000", "--grpc-port", "9000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cnnserve serve: --port and --grpc-port are both 9000; pick two ports"
    assert main(["serve", "--grpc-port", "9000", "--probe-port", "9000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cnnserve serve: --grpc-port and --probe-port are both 9000; pick two ports"
    assert main(["serve", "--port", "9001", "--probe-port", "9002"]) == 0
    assert served[-1].probe_port == 9002
    assert main(["serve", "--workers", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cnnserve serve: --workers: ") and "\n" not in err
    assert len(served) == 3  # nothing was served with a refused flag


def test_a_bad_environment_variable_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CNNSERVE_PORT", "http")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cnnserve: CNNSERVE_PORT: ") and "\n" not in err
    monkeypatch.setenv("CNNSERVE_PORT", "8000")
    monkeypatch.setenv("CNNSERVE_MAX_IMAGES_PER_REQUEST", "4000")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("cnnserve: CNNSERVE_MAX_IMAGES_PER_REQUEST (4000) and ") and "\n" not in err
    )


def test_a_misspelt_variable_stops_serve_naming_the_setting_it_meant(
    served: list[Settings], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """pydantic ignores a CNNSERVE_ variable that is no setting: a misspelt key file
    served without keys, without a word (an outside audit, 12-07)."""
    monkeypatch.setenv("CNNSERVE_API_KEY_FILE", "/run/secrets/keys")
    monkeypatch.setenv("cnnserve_shutdown_grace_second", "30")  # read in any case
    monkeypatch.setenv("CNNSERVE_NOTHING_LIKE_IT", "1")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("cnnserve serve: ")
    assert "CNNSERVE_API_KEY_FILE is not a setting (did you mean CNNSERVE_API_KEYS_FILE?)" in err
    assert "cnnserve_shutdown_grace_second is not a setting (did you mean " in err
    assert "CNNSERVE_SHUTDOWN_GRACE_SECONDS?)" in err
    assert "CNNSERVE_NOTHING_LIKE_IT is not a setting; " in err
    assert not served
    # What the server sets for its workers is no mistake; every setting is welcome.
    for name in (
        "CNNSERVE_API_KEY_FILE",
        "cnnserve_shutdown_grace_second",
        "CNNSERVE_NOTHING_LIKE_IT",
    ):
        monkeypatch.delenv(name)
    from service.readiness import READINESS_DIR_ENV
    from service.server import SUPERVISOR_ENV
    from service.siblings import SIBLINGS_DIR_ENV

    for name in (READINESS_DIR_ENV, SIBLINGS_DIR_ENV, SUPERVISOR_ENV):
        monkeypatch.setenv(name, "1")
    # Kubernetes' variables for a Service named cnnserve-gateway in the namespace.
    links = {
        "CNNSERVE_GATEWAY_SERVICE_HOST": "10.0.0.1",
        "CNNSERVE_GATEWAY_SERVICE_PORT_HTTP": "8000",
        "CNNSERVE_GATEWAY_PORT": "tcp://10.0.0.1:8000",
        "CNNSERVE_GATEWAY_PORT_8000_TCP_ADDR": "10.0.0.1",
    }
    for name, value in links.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CNNSERVE_SHUTDOWN_GRACE_SECONDS", "30")
    assert main(["serve"]) == 0
    assert served[0].shutdown_grace_seconds == 30


def test_serve_help_shows_the_defaults_in_effect(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CNNSERVE_POLL_SECONDS", "7.5")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 7.5)" in out and "(default: 8500)" in out
    assert "gRPC port; 0 disables gRPC" in out  # the Settings field's description


def test_train_defaults_are_the_training_configs() -> None:
    from service.training.config import AugmentConfig, TrainConfig

    args = build_parser(Settings()).parse_args(["train"])
    assert args.epochs == TrainConfig().epochs and args.lr == TrainConfig().learning_rate
    assert args.rotation == AugmentConfig().rotation_degrees
    assert args.optimizer == TrainConfig().optimizer


def test_publishing_an_unconfigured_model_prints_the_block_to_add(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli_train import _say_if_unserved
    from service.repository import read_repository
    from tests.helpers.models import simple_config, write_models_config

    write_models_config(tmp_path, simple_config("fashion_mnist"))
    _say_if_unserved(tmp_path, "fashion_mnist")
    assert capsys.readouterr().err == ""
    _say_if_unserved(tmp_path, "flowers")
    err = capsys.readouterr().err
    assert "'flowers' is not in" in err
    # The printed block, pasted into the file, makes a config that serves the model.
    block = err.split("model_config_list { ... }:\n", 1)[1]
    write_models_config(tmp_path, simple_config("fashion_mnist") + "\n" + block)
    assert [c.name for c in read_repository(tmp_path)] == ["fashion_mnist", "flowers"]
    # A repository without models.config (a scratch one) gets one serving the model.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    _say_if_unserved(scratch, "flowers")
    assert "wrote" in capsys.readouterr().err
    assert [c.name for c in read_repository(scratch)] == ["flowers"]


def test_httpx_request_lines_only_in_verbose_mode() -> None:
    # `cnnserve verify` sends thousands of requests; httpx logs each at INFO.
    httpx_log = logging.getLogger("httpx")
    try:
        setup_logging(verbose=False)
        assert httpx_log.level == logging.WARNING  # whatever the root logger's level
        setup_logging(verbose=True)
        assert httpx_log.level == logging.NOTSET  # the root's level again
    finally:
        httpx_log.setLevel(logging.NOTSET)


def test_grpc_tracebacks_for_answers_a_client_left_are_not_logged() -> None:
    # grpc.aio logs one at ERROR, with a traceback, per call whose client left before
    # its answer was sent: hundreds when a client holding many disconnects.
    cygrpc = logging.getLogger("grpc._cython.cygrpc")
    left = cygrpc.makeRecord(
        cygrpc.name,
        logging.ERROR,
        __file__,
        1,
        "ExecuteBatchError raised in core by servicer method [%s]",
        ("/x/Y",),
        None,
    )
    other = cygrpc.makeRecord(cygrpc.name, logging.ERROR, __file__, 1, "other", (), None)
    try:
        setup_logging(verbose=False)
        assert not cygrpc.filter(left) and cygrpc.filter(other)
    finally:
        cygrpc.filters.clear()


def test_serve_stops_in_one_line_before_any_worker_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each worker printed a traceback (and with several the supervisor exited 0).
    assert main(["serve", "--model-repository", str(tmp_path / "none"), "--workers", "2"]) == 3
    err = capsys.readouterr().err
    assert "models.config does not exist" in err and "Traceback" not in err
    # A gRPC port another server's workers hold (shared, as ours share it): with several
    # workers a second server joined it and split its connections.
    repository = Path(__file__).resolve().parents[2] / "model_repository"
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["serve", "--model-repository", str(repository), "--grpc-port", str(port)]
        with socket.socket() as free:  # a REST port nothing listens on
            free.bind(("127.0.0.1", 0))
            rest = str(free.getsockname()[1])
        assert main([*args, "--workers", "2", "--port", rest]) == 3
        assert "gRPC cannot listen" in capsys.readouterr().err
        # The REST port in use: uvicorn's bind said neither which port nor what to do.
        args = ["serve", "--model-repository", str(repository), "--port", str(port)]
        assert main([*args, "--grpc-port", "0", "--workers", "2"]) == 3
        err = capsys.readouterr().err
        assert f"REST cannot listen on 127.0.0.1:{port}" in err and "another server" in err
        # The probe port in use: said before any worker starts, with its flag.
        args = ["serve", "--model-repository", str(repository), "--probe-port", str(port)]
        assert main([*args, "--grpc-port", "0", "--port", rest, "--workers", "2"]) == 3
        err = capsys.readouterr().err
        assert f"the probe port cannot listen on 127.0.0.1:{port}" in err
        assert "(--probe-port, CNNSERVE_PROBE_PORT; 0 = none)" in err
    # An address this machine lacks: the port is not the problem (it asked for a server).
    args = ["serve", "--model-repository", str(repository), "--host", "999.1.1.1"]
    assert main([*args, "--grpc-port", "0"]) == 3
    err = capsys.readouterr().err
    assert "is it an address of this machine? (--host" in err and "another server" not in err
    # A file where the repository should be: NotADirectoryError's traceback before.
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["serve", "--model-repository", str(afile)]) == 3
    assert "is a file, not a folder" in capsys.readouterr().err


def test_serve_names_tls_files_it_cannot_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNNSERVE_TLS_CERTFILE", str(tmp_path / "missing.pem"))
    monkeypatch.setenv("CNNSERVE_TLS_KEYFILE", str(tmp_path / "missing.key"))
    repository = Path(__file__).resolve().parents[2] / "model_repository"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    args = ["serve", "--model-repository", str(repository), "--grpc-port", "0", "--port", port]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "TLS certificate" in err and "missing.pem" in err and "Traceback" not in err


def test_training_only_on_folders_needs_a_model_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The default model name is the served Fashion-MNIST model: other classes published
    # there would become its next version (and be served by `latest`).
    args = ["train", "--dataset", str(tmp_path), "--repository", str(tmp_path / "repo")]
    assert main(args) == 2
    assert "--model-name" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--epochs", "0"],
        ["train", "--limit", "-5"],
        ["train", "--batch-size", "0"],
        ["compress", "--sparsity", "1.5"],
        ["evaluate", "x", "--latency-runs", "0"],
        ["data", "audit", "--output", "x", "--folds", "1"],
        ["verify", "--limit", "-1"],
    ],
)
def test_out_of_range_numbers_are_refused_before_any_work(argv: list[str]) -> None:
    # They became a TensorFlow traceback, an untrained version, or a numpy error
    # after fine-tuning had run.
    with pytest.raises(SystemExit) as exited:
        build_parser(Settings()).parse_args(argv)
    assert exited.value.code == 2


def test_evaluate_on_a_folder_that_is_no_version_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["evaluate", "model_repository"]) == 2
    assert "not a version published by cnnserve" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("card", "words"),
    [
        ({}, "its model card has no preprocessing or training section"),
        ({"preprocessing": {}, "training": []}, "its model card has no training section"),
        (
            {"preprocessing": {"resize_method": "bogus"}, "training": {}},
            "its model card's preprocessing or training section is not as cnnserve writes it",
        ),
    ],
)
def test_evaluate_on_a_card_without_its_sections_is_one_line(
    card: dict[str, object], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A card that is JSON but lacks a section (or holds one of another type) was a
    KeyError or AttributeError traceback."""
    version = tmp_path / "m" / "1"
    (version / "assets.extra").mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"")
    (version / "assets.extra" / "model_card.json").write_text(json.dumps(card))
    assert main(["evaluate", str(version)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cnnserve: {version}: {words}") and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["train", "--dropout", "2"], "--dropout: must be in [0, 1)"),
        (["train", "--lr", "-1"], "--lr: must be more than 0"),
        (["train", "--width", "0"], "--width: must be more than 0"),
        (["train", "--model-name", "../evil"], "--model-name: '../evil'"),
        # compress published into another repository through its --model.
        (["compress", "--method", "int8", "--model", "../repoB/toy"], "--model: '../repoB/toy'"),
        (["bench", "--model", "../x"], "--model: '../x'"),
        (["train", "--repository", "FILE"], "is a file; give a folder"),
        (["evaluate", "model_repository/fashion_mnist/1", "--output", "FILE"], "is a file"),
        (["experiments", "--output", "FILE"], "is a file"),
        (["verify", "--output", "FILE"], "is a file"),
        (["verify", "--show", "-2"], "--show: must be at least 0"),
        (["compress", "--method", "int8", "--test-limit", "-4"], "must be at least 0"),
        (["compress", "--method", "distill", "--temperature", "-1"], "--temperature"),
        (["compress", "--method", "distill", "--alpha", "3"], "--alpha: must be in [0, 1]"),
        (["bench", "--batching", "foo"], "e.g. 32:1000:1"),
        (["bench", "--workers", "x"], "comma-separated whole numbers"),
        (["bench", "--concurrency", "-4"], "each must be at least 1"),
        (["bench", "--seconds", "-1"], "--seconds: must be more than 0"),
        (["promote", "m", "1", "--label", "x", "--timeout", "-5"], "--timeout"),
    ],
)
def test_values_out_of_range_stop_at_the_command_line(
    argv: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each was a traceback after minutes of work, or silently accepted (a negative
    learning rate trained and published a version)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit) as stopped:
        main([str(afile) if a == "FILE" else a for a in argv])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err


def test_bench_without_a_gateway_at_its_url_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # nothing listens once closed
    assert main(["bench", "--url", f"http://127.0.0.1:{port}"]) == 2
    assert "no gateway answers" in capsys.readouterr().err


def test_bench_with_a_url_that_does_not_parse_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    # httpx.InvalidURL is no httpx.HTTPError: it was a traceback.
    assert main(["bench", "--url", "http://[::1"]) == 2
    err = capsys.readouterr().err
    assert err == "cnnserve bench: --url 'http://[::1' is not a URL: Invalid port: ':1'\n"


def test_a_bad_flag_is_one_line_naming_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--epochs", "0"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        "cnnserve train: error: argument --epochs: must be at least 1, got 0 "
        "(see cnnserve train --help)\n"
    )


def test_ctrl_c_is_one_line_saying_how_to_go_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import service.cli_train

    def interrupted(*_: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(service.cli_train, "_train", interrupted)
    assert main(["train", "--work-dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err == (
        "cnnserve train: interrupted; rerun the same command to resume from the last "
        "finished epoch\n"
    )


def test_the_file_system_saying_no_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A read-only repository or a full disk under promote (models.config stayed whole:
    the write is atomic) was a traceback."""
    import errno

    import service.config_edit

    def disk_full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(service.config_edit, "write_atomically", disk_full)
    repo = tmp_path / "repo"  # a copy: were the patch to miss, the real one stays
    repo.mkdir()
    shutil.copy(ROOT / "model_repository" / "models.config", repo)
    (repo / "fashion_mnist").symlink_to(ROOT / "model_repository" / "fashion_mnist")
    code = main(["promote", "fashion_mnist", "1", "--label", "stable", "--no-wait",
                 "--url", "http://127.0.0.1:9", "--model-repository", str(repo)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.strip().splitlines()[-1] == (
        f"cnnserve promote: No space left on device ({repo / 'models.config'})"
    )
    assert "Traceback" not in err


def test_verify_checks_its_output_folder_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """It ran the whole check, then lost the results to a traceback writing report.json
    (exit 1, which means "the server disagrees")."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    code = main(["verify", "--url", "http://127.0.0.1:9", "--output", str(a_file / "report")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"cnnserve verify: cannot write the report to {a_file / 'report'}")


@pytest.mark.parametrize("command", ["train", "bench", "verify", "promote"])
def test_help_says_defaults_and_no_none(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`train --help` named no default for --optimizer or --schedule, bench's none at all,
    and others said "(default: None)" of options that have none."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert text.count("(default: ") >= 3
    if command == "train":
        assert "optimizer (default: sgd)" in text and "(default: plateau)" in text


def test_a_repository_that_cannot_be_published_into_is_refused_before_the_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """CNNSERVE_MODEL_REPOSITORY naming a file (the flag's check skipped a default), or a
    path under a file, was found after the whole fit."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    monkeypatch.setenv("CNNSERVE_MODEL_REPOSITORY", str(a_file))
    for command in (["train"], ["compress", "--method", "int8"]):
        with pytest.raises(SystemExit) as exited:
            main(command)
        assert exited.value.code == 2
        assert f"{a_file} is a file; give a folder" in capsys.readouterr().err
    monkeypatch.delenv("CNNSERVE_MODEL_REPOSITORY")
    under = a_file / "repo"
    assert main(["train", "--repository", str(under)]) == 2
    assert capsys.readouterr().err == (
        f"cnnserve train: cannot publish into {under / 'fashion_mnist'}: {a_file} is a file; "
        "choose another --repository\n"
    )
    assert main(["compress", "--method", "int8", "--model-repository", str(under)]) == 2
    assert f"cnnserve compress: cannot publish into {under / 'fashion_mnist'}" in (
        capsys.readouterr().err
    )


def test_every_option_with_a_default_says_it_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse prints no default for an option without help text: compress --help
    showed --model as if it had to be given."""
    parser = build_parser(Settings())

    def options(p: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
        found = []
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += [(f"{name} {o}", a) for o, a in options(sub)]
            elif action.option_strings:
                found.append((action.option_strings[-1], action))
        return found

    silent = [
        name
        for name, action in options(parser)
        if action.default is not None and action.default is not False and not action.help
    ]
    assert not silent, silent
    with pytest.raises(SystemExit):
        parser.parse_args(["compress", "--help"])
    assert "(default: fashion_mnist)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--optimizer", "sgd", "--weight-decay", "0.01"], "--weight-decay is for adamw and radam"),
        (["--optimizer", "adam", "--weight-decay", "0.01"], "use --l2"),
        (["--balance", "--class-weight", "balanced"], "choose one"),
    ],
)
def test_train_refuses_settings_it_would_not_apply_as_recorded(
    argv: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before any data is read: sgd and adam never applied --weight-decay (the
    card said they did); --balance with balanced class weights evened the classes twice."""
    code = main(["train", "--repository", str(tmp_path / "repo"), *argv])
    assert code == 2 and words in capsys.readouterr().err


def test_an_interrupted_command_whose_unwinding_hangs_exits_all_the_same() -> None:
    """Unwinding an interrupted fit can deadlock in TF's teardown of its tf.data
    iterators (a SIGTERM hung a CI run for a minute): the handler's timer exits 130 with
    the command's one line however the unwinding goes."""
    script = (
        "import signal, threading, time\n"
        "from service.cli import _Interrupt\n"
        "signal.signal(signal.SIGTERM, _Interrupt('train'))\n"
        "try:\n"
        "    print('ready', flush=True)  # inside: a signal after it meets the finally\n"
        "    time.sleep(60)\n"
        "finally:\n"
        "    lock = threading.Lock()\n"
        "    lock.acquire()\n"
        "    lock.acquire()  # a teardown that never returns\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 130
    finally:
        process.kill()
    assert process.stderr is not None
    assert process.stderr.read().strip().splitlines()[-1].startswith("cnnserve train: interrupted")
