"""Reading the model repository: config files that cannot be read, base paths under
/models, and the fingerprint that decides when a failed version is retried."""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from service import metrics
from service import repository as repository_module
from service.config import Settings
from service.errors import ConfigError, ModelLoadError
from service.registry import Registry, VersionState
from service.repository import (
    ModelConfig,
    ModelsConfigReader,
    load_batching_parameters,
    read_config_text,
    read_repository,
    resolve_base_path,
    version_fingerprint,
)
from service.runtimes import create_runtime
from service.runtimes.base import Runtime
from service.server import startup_problem
from tests.helpers.core import run_with, settings
from tests.helpers.models import publish_tiny, simple_config, write_models_config

# --- a models.config that cannot be read -----------------------------------------------


def _not_utf8(path: Path) -> None:
    path.write_bytes(b"model_config_list { config { name: '\xff\xfe' } }\n")


def _folder(path: Path) -> None:
    path.mkdir()


def _unreadable(path: Path) -> None:
    path.write_text("model_config_list {}\n")
    path.chmod(0)  # as root this does not stop reads: the test patches read_text too


UNREADABLE = [
    pytest.param(_not_utf8, "is not UTF-8 text", id="not-utf8"),
    pytest.param(_folder, "is a folder", id="folder"),
    pytest.param(_unreadable, "cannot be read: Permission denied", id="chmod-000"),
]


@pytest.fixture
def no_reads_of_mode_0(monkeypatch: pytest.MonkeyPatch) -> None:
    """Path.read_text refuses a file with no permission bits, whoever runs the tests."""
    original = Path.read_text

    def read_text(self: Path, *args: Any, **kwargs: Any) -> str:
        if self.is_file() and stat.S_IMODE(self.stat().st_mode) == 0:
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)


@pytest.mark.usefixtures("no_reads_of_mode_0")
@pytest.mark.parametrize(("spoil", "problem"), UNREADABLE)
def test_a_config_file_that_cannot_be_read_is_a_config_error_naming_it(
    tmp_path: Path, spoil: Any, problem: str
) -> None:
    spoil(tmp_path / "models.config")
    with pytest.raises(ConfigError, match=problem) as info:
        read_repository(tmp_path)
    with pytest.raises(ConfigError, match=problem):  # for the CLIs that edit the text
        read_config_text(tmp_path / "models.config")
    assert str(tmp_path / "models.config") in str(info.value)
    spoil(tmp_path / "batching.config")  # every text-proto file reads the same way
    with pytest.raises(ConfigError, match=problem):
        load_batching_parameters(tmp_path)


@pytest.mark.usefixtures("no_reads_of_mode_0")
@pytest.mark.parametrize(("spoil", "problem"), UNREADABLE)
def test_start_up_names_an_unreadable_models_config_in_one_line(
    tmp_path: Path, spoil: Any, problem: str
) -> None:
    spoil(tmp_path / "models.config")
    # `cnnserve serve` prints this line and exits 3 (a traceback and exit 1 before).
    line = startup_problem(Settings(model_repository=tmp_path))
    assert line is not None and "\n" not in line
    assert problem in line and str(tmp_path / "models.config") in line


# --- base paths -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_path", "expected"),
    [
        ("/models/team/shoes", "repo/team/shoes"),
        ("/models/a/b/c", "repo/a/b/c"),
        ("/models/m", "repo/m"),
        ("/models/other", "repo/other"),
        ("", "repo/m"),
        ("/models", "repo"),
        ("rel/m", "repo/rel/m"),
        ("/srv/models/m", "/srv/models/m"),
    ],
)
def test_a_base_path_under_models_keeps_every_folder(base_path: str, expected: str) -> None:
    # TF Serving with the repository mounted at /models reads /models/team/shoes.
    assert resolve_base_path(Path("repo"), "m", base_path) == Path(expected)


def test_a_nested_base_path_is_not_mistaken_for_a_sibling(tmp_path: Path) -> None:
    (tmp_path / "shoes" / "1").mkdir(parents=True)  # another model's folder
    (tmp_path / "models.config").write_text(
        "model_config_list { config { name: 'shoes' base_path: '/models/team/shoes' } }\n"
    )
    [config] = read_repository(tmp_path)
    assert config.base_path == tmp_path / "team" / "shoes"


# --- the fingerprint of a failed version ------------------------------------------------


def test_the_fingerprint_changes_with_permissions(tmp_path: Path) -> None:
    version = tmp_path / "1"
    (version / "variables").mkdir(parents=True)
    pb = version / "saved_model.pb"
    pb.write_bytes(b"pb")
    shard = version / "variables" / "variables.data-00000-of-00001"
    shard.write_bytes(b"data")
    readable = version_fingerprint(version)
    for path in (pb, shard, version / "variables", version):
        mode = stat.S_IMODE(path.stat().st_mode)
        path.chmod(0)
        assert version_fingerprint(version) != readable, path
        path.chmod(mode)
        assert version_fingerprint(version) == readable, path


class ModeCheckingFactory:
    """create_runtime, refusing a saved_model.pb its owner may not read (what the load
    meets when the server does not run as root, which tests may)."""

    def __call__(self, name: str, version_dir: Path, **kwargs: Any) -> Runtime:
        if not (version_dir / "saved_model.pb").stat().st_mode & stat.S_IRUSR:
            raise ModelLoadError(f"{version_dir / 'saved_model.pb'}: Permission denied")
        return create_runtime(name, version_dir, **kwargs)


def test_a_version_that_failed_for_its_permissions_is_retried_once_they_are_fixed(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    publish_tiny(repo, "m")
    write_models_config(repo, simple_config("m", policy="all {}"))
    registry = Registry(settings(repo, tmp_path), runtime_factory=ModeCheckingFactory())

    def failures() -> float:
        labels = {"model": "m", "event": "load_failed"}
        return metrics.REGISTRY.get_sample_value("cnnserve_model_events_total", labels) or 0.0

    async def scenario() -> None:
        await registry.start()
        v2 = repo / "m" / "2"
        shutil.copytree(repo / "m" / "1", v2)
        (v2 / "saved_model.pb").chmod(0o200)
        failed = failures()
        await registry.poll_once()
        assert registry.statuses("m", version=2)[0].state == VersionState.END
        await registry.poll_once()  # nothing changed: not retried every poll
        assert failures() == failed + 1
        (v2 / "saved_model.pb").chmod(0o644)  # the size and mtime stay as they were
        await registry.poll_once()
        assert registry.statuses("m", version=2)[0].state == VersionState.AVAILABLE
        assert failures() == failed + 1

    run_with(registry, scenario)


# --- models.config parsed again only when it changes ----------------------------------


def test_a_poll_parses_models_config_again_only_when_it_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 50 MB models.config that parses was parsed on every poll, in every worker."""
    parsed: list[Path] = []
    read_models_config = repository_module.read_models_config

    def counted(repository: Path) -> Any:
        parsed.append(repository)
        return read_models_config(repository)

    monkeypatch.setattr(repository_module, "read_models_config", counted)
    path = tmp_path / "models.config"

    def rewrite(text: str) -> None:  # in place, its mtime another whatever the clock's tick
        before = path.stat().st_mtime_ns
        path.write_text(text)
        os.utime(path, ns=(before - 10**9, before - 10**9))

    write_models_config(tmp_path, simple_config("a"))
    reader = ModelsConfigReader()
    # Written within the clock's tick of the read: the same stat may hide a change.
    monkeypatch.setattr(repository_module, "SETTLED_SECONDS", 1e9)
    assert [c.name for c in reader.read(tmp_path)] == ["a"]
    assert [c.name for c in reader.read(tmp_path)] == ["a"]
    assert len(parsed) == 2
    # Settled: parsed once until it changes, in place and of the same size.
    monkeypatch.setattr(repository_module, "SETTLED_SECONDS", -1.0)
    reader.read(tmp_path)
    assert [c.name for c in reader.read(tmp_path)] == ["a"] and len(parsed) == 3
    rewrite(path.read_text().replace('"a"', '"b"').replace("/a", "/b"))
    assert [c.name for c in reader.read(tmp_path)] == ["b"] and len(parsed) == 4
    rewrite("not a config")
    for _ in range(2):  # a refusal is kept too, raised again
        with pytest.raises(ConfigError):
            reader.read(tmp_path)
    assert len(parsed) == 5


def test_a_label_given_twice_for_a_model_is_said_once_per_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The parsed map keeps the last one (as TF Serving's) without a word: a hand edit
    that added a label's new line and kept the old one (an outside audit, 12-07). Read
    from the file's tokens: comments, both brackets, a colon before the block, another
    model's same label and the same value twice are no repeat."""
    text = """model_config_list {
  config { name: "m"  # canary "a comment" { }
    base_path: "/models/m" model_platform: "tensorflow"
    version_labels { key: "canary" value: 1 }
    version_labels { key: "stable" value: 1 }
    version_labels: < key: 'canary' value: 2 >
    version_labels { key: "stable" value: 01 }
  }
  config { name: "n" base_path: "/models/n" model_platform: "tensorflow"
    version_labels { key: "canary" value: 3 } }
}
"""
    assert repository_module.repeated_labels(text) == [
        "model 'm': label 'canary' is given as 1, then 2 (2 counts)"
    ]
    write_models_config(tmp_path, simple_config("a"))
    (tmp_path / "models.config").write_text(text)
    monkeypatch.setattr(repository_module, "SETTLED_SECONDS", 1e9)  # parsed every read
    reader = ModelsConfigReader()
    with caplog.at_level(logging.WARNING, logger="service.repository"):
        for _ in range(3):
            assert reader.read(tmp_path)[0].labels == {"canary": 2, "stable": 1}
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "label 'canary' is given as 1, then 2" in said[0], said
    assert "give each label once" in said[0]


def _read_twice(
    reader: ModelsConfigReader,
    repository: Path,
    body: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> tuple[list[ModelConfig], list[str]]:
    """models.config of ``body`` read twice by ``reader``, parsed each time: what it
    configures, and the warnings said."""
    monkeypatch.setattr(repository_module, "SETTLED_SECONDS", 1e9)  # parsed every read
    write_models_config(repository, body)
    with caplog.at_level(logging.WARNING, logger="service.repository"):
        configs = reader.read(repository)
        assert reader.read(repository) == configs
    return configs, [r.getMessage() for r in caplog.records]


def test_what_tf_serving_refuses_is_said_once_per_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway serves a model with no model_platform, or an empty or relative
    base_path (as <repository>/<name>, <repository>/<path>); TF Serving refuses to start
    on such a file, so a repository that served locally failed in the stack (docker/)."""
    body = (
        'config { name: "a" }\n'
        'config { name: "b" base_path: "team/b" model_platform: "tensorflow" }\n'
        'config { name: "c" base_path: "/srv/c" model_platform: "tensorflow" }\n'
        'config { name: "d" base_path: "s3://bucket/d" model_platform: "tensorflow" }'
    )
    reader = ModelsConfigReader()
    (a, b, _, _), said = _read_twice(reader, tmp_path, body, monkeypatch, caplog)
    assert (a.base_path, b.base_path) == (tmp_path / "a", tmp_path / "team" / "b")  # served
    assert len(said) == 3, said
    assert (
        "model 'a' names no model_platform" in said[0] and 'model_platform: "tensorflow"' in said[0]
    )
    assert "model 'a' has no base_path" in said[1] and 'base_path: "/models/a"' in said[1]
    assert "model 'b' has a relative base_path 'team/b'" in said[2]
    assert 'base_path: "/models/team/b"' in said[2]
    caplog.clear()
    write_models_config(tmp_path, simple_config("a", "b"))  # fixed: nothing more said
    with caplog.at_level(logging.WARNING, logger="service.repository"):
        reader.read(tmp_path)
    assert not caplog.records


def test_a_model_rest_urls_cannot_name_is_said_and_still_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """TF Serving's REST API ends a model's name at "/" (/v1/models/([^/:]+)), and so do
    the gateway's routes: "team/shoes" was served over gRPC and answered "no route" on
    every /v1/models/ URL, with nothing said at load. The gateway's routes take "a:b"
    (the verb is after the last colon)."""
    body = (
        'config { name: "team/shoes" base_path: "/models/shoes" model_platform: "tensorflow" }\n'
        'config { name: "a:b" base_path: "/models/ab" model_platform: "tensorflow" }\n'
        'config { name: "plain-name.v2" base_path: "/models/p" model_platform: "tensorflow" }'
    )
    configs, said = _read_twice(ModelsConfigReader(), tmp_path, body, monkeypatch, caplog)
    assert [c.name for c in configs] == ["team/shoes", "a:b", "plain-name.v2"]  # all served
    assert len(said) == 1, said
    assert "model 'team/shoes' has '/' in its name" in said[0]
    assert "POST /v1/classify?model=<name>" in said[0]


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ("", "configures no model; add a config { }"),
        ('config { name: "a" } config { name: "a" }', "model names must be unique"),
        ('config { name: "a\\000b\\n}" }', "model name 'a\\x00b\\n}' holds a control character"),
        ('config { name: "a\u2028b" }', "model name 'a\\u2028b' holds a control character"),
    ],
)
def test_a_models_config_without_models_says_so(tmp_path: Path, body: str, said: str) -> None:
    """An empty model_config_list was told its names must be unique and non-empty."""
    write_models_config(tmp_path, body)
    with pytest.raises(ConfigError, match=re.escape(said)):
        read_repository(tmp_path)


def test_a_version_folder_that_may_not_be_read_is_named_not_its_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder set to chmod 000 was blamed on its model_card.json (an outside review;
    simulated: the tests may run as root, whom permissions do not stop)."""
    version = tmp_path / "3"
    (version / "assets.extra").mkdir(parents=True)

    def denied(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ModelLoadError, match="unreadable model card"):
        repository_module.load_card(version)
    monkeypatch.setattr(repository_module.os, "listdir", denied)
    with pytest.raises(
        ModelLoadError, match=f"^{re.escape(str(version))}: cannot read the version"
    ):
        repository_module.load_card(version)
