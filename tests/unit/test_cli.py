from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.cli import ARCHITECTURE_NAMES, build_parser, main
from service.config import Settings

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
    for command in ("train", "evaluate", "serve"):
        assert command in out.stdout


@pytest.mark.parametrize("command", ["train", "evaluate", "serve"])
def test_each_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: cnnserve " + command in capsys.readouterr().out


def test_architecture_names_match_the_registry() -> None:
    from service.training.architectures import ARCHITECTURES

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
