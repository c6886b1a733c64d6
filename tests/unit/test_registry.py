"""The repository reader and the registry on real tiny SavedModels in temp repositories.

One tiny model is published per module; every version a test needs is a copy of it, so
a test pays for loading models (under a second each), not for building them. Registry
scenarios are coroutines run with asyncio.run; concurrency is coordinated with events.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service import metrics, repository
from service import registry as registry_module
from service.errors import (
    ConfigError,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    UnknownVersionLabel,
    VersionNotFound,
)
from service.registry import Registry, VersionState
from service.repository import (
    MAX_FINGERPRINT_ENTRIES,
    ModelConfig,
    load_card,
    read_card,
    read_labels,
    read_repository,
    read_warmup,
    version_fingerprint,
)
from service.runtimes import create_runtime
from service.runtimes.base import Runtime
from service.warmup import WarmupFormatError
from tests.helpers.core import IMAGES, run_with, settings
from tests.helpers.models import publish_tiny, simple_config, write_models_config

# --- fixtures and helpers ------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One published tiny version (labels cat/dog/bird, warmup records, card)."""
    return publish_tiny(tmp_path_factory.mktemp("template"), "m")


def add_version(
    repo: Path, model: str, version: int, template: Path, *, labels: bool = True
) -> Path:
    path = repo / model / str(version)
    shutil.copytree(template, path)
    if not labels:
        (path / "assets.extra" / "labels.txt").unlink()
    return path


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Versions without labels.txt are loaded at once, as if their folder had settled
    (service.repository.unsettled holds back one that changed moments ago)."""
    monkeypatch.setattr(repository, "SETTLE_SECONDS", 0.0)


def serving_one_version(template: Path, tmp_path: Path) -> Path:
    """A repository whose models.config serves model "m", its version 1 on disk."""
    repo = tmp_path / "repo"
    add_version(repo, "m", 1, template)
    write_models_config(repo, simple_config("m"))
    return repo


def config_entry(name: str, policy: str, labels: dict[str, int] | None = None) -> str:
    label_text = " ".join(
        f'version_labels {{ key: "{k}" value: {v} }}' for k, v in (labels or {}).items()
    )
    return (
        f'config {{ name: "{name}" base_path: "/models/{name}" model_platform: "tensorflow" '
        f"model_version_policy {{ {policy} }} {label_text} }}"
    )


def states(registry: Registry, model: str) -> dict[int, VersionState]:
    return {s.version: s.state for s in registry.statuses(model)}


class CountingFactory:
    """create_runtime, recording which folders it was asked to load."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def __call__(self, name: str, version_dir: Path, **kwargs: Any) -> Runtime:
        self.paths.append(version_dir)
        return create_runtime(name, version_dir, **kwargs)


# --- models.config and version folders (no loading) ----------------------------------


def cfg(policy: str, num_versions: int = 1, versions: tuple[int, ...] = ()) -> ModelConfig:
    return ModelConfig("m", Path("/r/m"), policy, num_versions, versions)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "available", "wanted"),
    [
        (cfg("latest"), [1, 2, 3], {3}),
        (cfg("latest", num_versions=2), [3, 1, 2], {2, 3}),
        (cfg("latest", num_versions=5), [1, 2], {1, 2}),
        (cfg("latest"), [], set()),
        (cfg("specific", versions=(1, 3, 7)), [1, 2, 3], {1, 3}),  # 7 is not on disk
        (cfg("all"), [1, 2, 10], {1, 2, 10}),
    ],
)
def test_wanted_versions_follow_tf_serving_policies(
    config: ModelConfig, available: list[int], wanted: set[int]
) -> None:
    assert config.wanted_versions(available) == wanted


def test_read_repository_types_every_config(tmp_path: Path) -> None:
    write_models_config(
        tmp_path,
        config_entry("b", "specific { versions: 1 versions: 2 }", {"stable": 1, "canary": 2})
        + '\nconfig { name: "a" base_path: "/models/a" model_platform: "tensorflow" }\n'
        + config_entry("c", "all {}")
        + '\nconfig { name: "d" base_path: "elsewhere/d" model_platform: "tensorflow" '
        "model_version_policy { latest { num_versions: 3 } } }",
    )
    b, a, c, d = read_repository(tmp_path)  # file order: b is the default model
    assert (b.name, b.policy, b.versions, dict(b.labels)) == (
        "b",
        "specific",
        (1, 2),
        {"stable": 1, "canary": 2},
    )
    assert b.base_path == tmp_path / "b"
    assert (a.policy, a.num_versions) == ("latest", 1)  # no policy: TF Serving's latest 1
    assert c.policy == "all"
    assert (d.policy, d.num_versions, d.base_path) == ("latest", 3, tmp_path / "elsewhere" / "d")


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        (config_entry("m", "specific { }"), "at least one version"),
        (config_entry("m", "all {}").replace('"tensorflow"', '"pytorch"'), "model_platform"),
        (config_entry("m", "all {}", {"bad": -1}), "version of 0 or more"),
        (config_entry("m", "latest { num_version: 1 }"), "num_version"),
    ],
)
def test_read_repository_refuses_what_tf_serving_would(
    tmp_path: Path, entry: str, words: str
) -> None:
    write_models_config(tmp_path, entry)
    with pytest.raises(ConfigError, match=words):
        read_repository(tmp_path)


def test_labels_file_or_class_indices(template: Path, tmp_path: Path) -> None:
    assert read_labels(template, 3) == ["cat", "dog", "bird"]
    bare = add_version(tmp_path, "m", 1, template, labels=False)
    assert read_labels(bare, 3) == ["0", "1", "2"]
    with pytest.raises(ModelLoadError, match=r"3 labels .* 4 classes"):
        read_labels(template, 4)
    # A byte order mark (Windows editors write one) is not part of the first label.
    labels = bare / "assets.extra" / "labels.txt"
    labels.write_text("cat\ndog\nbird\n", encoding="utf-8-sig")
    assert labels.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_labels(bare, 3) == ["cat", "dog", "bird"]


def test_a_version_served_without_labels_says_so(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, settled: None
) -> None:
    """Copied in file by file, a version loaded before its assets.extra arrived served
    class indices for good, and nothing in the log said so."""
    repo = tmp_path / "repo"
    add_version(repo, "m", 1, template, labels=False)
    write_models_config(repo, simple_config("m"))
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        with caplog.at_level(logging.WARNING, logger="service.loading"):
            await registry.start()
        assert registry.resolve("m").labels == ["0", "1", "2"]

    run_with(registry, scenario)
    said = [r.getMessage() for r in caplog.records if r.name == "service.loading"]
    assert len(said) == 1 and "has no assets.extra/labels.txt" in said[0], said


async def held_twice(registry: Registry, caplog: pytest.LogCaptureFixture, words: str) -> str:
    """Two polls that leave version 2 of "m" unloaded, version 1 serving; the one log
    line (not one a poll) that says why, holding ``words``."""
    with caplog.at_level(logging.INFO, logger="service.registry"):
        for _ in range(2):
            await registry.poll_once()
            assert registry.resolve("m").version == 1 and 2 not in states(registry, "m")
    said = [r.getMessage() for r in caplog.records if words in r.getMessage()]
    assert len(said) == 1, said
    return said[0]


def test_a_version_without_its_labels_yet_is_loaded_once_its_folder_settles(
    template: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Copied in file by file (variables, saved_model.pb, then assets.extra 3 s later), a
    version was loaded before its labels.txt arrived and served class indices for good
    (an outside review). Now one without labels.txt waits until its folder has not
    changed for SETTLE_SECONDS: loaded with its labels once they come, or without them
    once nothing changed for that long (a SavedModel that has none)."""
    repo = serving_one_version(template, tmp_path)
    registry = Registry(settings(repo, tmp_path))
    monkeypatch.setattr(repository, "SETTLE_SECONDS", 3600.0)  # every change is recent

    async def scenario() -> None:
        await registry.start()
        v2 = add_version(repo, "m", 2, template, labels=False)  # assets.extra not in yet
        said = await held_twice(registry, caplog, "has no assets.extra")
        assert "m version 2" in said
        shutil.copy(template / "assets.extra" / "labels.txt", v2 / "assets.extra")  # it came
        await registry.poll_once()
        assert registry.resolve("m").version == 2
        assert registry.resolve("m").labels == ["cat", "dog", "bird"]
        add_version(repo, "m", 3, template, labels=False)  # one that never has labels
        await registry.poll_once()
        assert registry.resolve("m").version == 2
        monkeypatch.setattr(repository, "SETTLE_SECONDS", 0.0)  # its folder settled
        await registry.poll_once()
        assert registry.resolve("m").version == 3
        assert registry.resolve("m").labels == ["0", "1", "2"]

    run_with(registry, scenario)


def test_a_version_whose_files_changed_moments_ago_is_loaded_once_they_are_quiet(
    template: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Copied in name order (rsync, cp -r), assets.extra and its labels.txt come first:
    the version was loaded at every poll while the rest came (24 failed loads for one
    copy, once served from a half-written variables.index; an outside audit). Now one
    whose files changed less than QUIET_SECONDS ago waits, however complete it looks."""
    repo = serving_one_version(template, tmp_path)
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        await registry.start()
        monkeypatch.setattr(repository, "QUIET_SECONDS", 3600.0)  # every change is recent
        add_version(repo, "m", 2, template)  # labels and all: a copy just made
        said = await held_twice(registry, caplog, "unchanged for")
        assert "m version 2" in said and "has no" not in said
        assert not [r for r in caplog.records if "failed to load" in r.getMessage()]
        monkeypatch.setattr(repository, "QUIET_SECONDS", 0.0)  # the copy ended
        await registry.poll_once()
        assert registry.resolve("m").version == 2

    run_with(registry, scenario)


def test_with_polling_off_a_held_version_is_loaded_once_its_wait_is_over(
    template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No poll would come to load it (polling off: a version a reload RPC found moments
    after its copy): the registry rescans once the wait is over."""
    repo = serving_one_version(template, tmp_path)
    registry = Registry(settings(repo, tmp_path))  # poll_seconds=0

    async def scenario() -> None:
        await registry.start()
        monkeypatch.setattr(repository, "QUIET_SECONDS", 1.0)
        add_version(repo, "m", 2, template)
        await registry.poll_once()
        assert registry.resolve("m").version == 1  # held: its files are moments old
        deadline = time.monotonic() + 20
        while registry.resolve("m").version != 2:  # no poll_once from here
            assert time.monotonic() < deadline, states(registry, "m")
            await asyncio.sleep(0.05)

    run_with(registry, scenario)


def test_a_present_card_must_be_readable(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = add_version(tmp_path, "m", 1, template)
    card = folder / "assets.extra" / "model_card.json"
    assert load_card(folder)["name"] == "m"
    for broken in ('{"name": "m", "preprocessing": ', "[1, 2]", b"\xff\xfe{}"):
        card.write_bytes(broken if isinstance(broken, bytes) else broken.encode())
        with pytest.raises(ModelLoadError, match=r"model_card\.json: .*(unreadable|not an object)"):
            load_card(folder)
        # Readers that only show a card (status and demo pages, verify) still get one.
        with caplog.at_level(logging.WARNING, logger="service.repository"):
            assert read_card(folder) == {}
        assert "ignoring" in caplog.text
    # A byte order mark (Windows editors write one) is not a broken card.
    card.write_text('{"name": "m"}', encoding="utf-8-sig")
    assert load_card(folder) == {"name": "m"}
    card.unlink()
    assert load_card(folder) == {}  # foreign SavedModels have none


def test_the_fingerprint_covers_every_file_of_a_version(template: Path, tmp_path: Path) -> None:
    folder = add_version(tmp_path, "m", 1, template)
    before = version_fingerprint(folder)
    assert version_fingerprint(folder) == before  # nothing changed: no retry
    # A file fixed in place: the folders' own stats do not change.
    labels = folder / "assets.extra" / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    after_labels = version_fingerprint(folder)
    assert after_labels != before
    (shard,) = (folder / "variables").glob("variables.data-*")
    stamp = shard.stat()
    os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))
    assert version_fingerprint(folder) != after_labels
    assert version_fingerprint(tmp_path / "missing") == (0, 0)
    # Other folders count by their own entry: a docs/ of hundreds of files filled the
    # cap before assets.extra/ was reached (and cost a walk every poll).
    docs = folder / "docs"
    docs.mkdir()
    for i in range(MAX_FINGERPRINT_ENTRIES + 50):
        (docs / f"{i:05d}").touch()
    crowded = version_fingerprint(folder)
    assert len(crowded) < 3 * 40  # the version's own dozen entries, docs/ as one
    labels.write_text("cat\ndog\nbird\nfish\n")
    assert version_fingerprint(folder) != crowded
    # Bounded: a loaded folder of thousands of files costs at most the cap in stats.
    for i in range(MAX_FINGERPRINT_ENTRIES * 2):
        (folder / "assets.extra" / f"extra-{i:05d}").touch()
    assert len(version_fingerprint(folder)) <= 2 + 3 * 3 * MAX_FINGERPRINT_ENTRIES


def test_warmup_reader_replays_serving_default_and_refuses_corrupt_files(
    template: Path, tmp_path: Path
) -> None:
    # publish_tiny wrote TF Serving's records: serving_default at batch 1 and 8, plus one
    # predict_image_bytes request that replay skips.
    got = read_warmup(template)
    assert [list(r) for r in got] == [["image"], ["image"]]
    assert [(r["image"].shape, r["image"].dtype) for r in got] == [
        ((1, 224, 224, 3), np.uint8),
        ((8, 224, 224, 3), np.uint8),
    ]
    assert read_warmup(tmp_path / "no-such-version") == []

    # A flipped byte fails TFRecord's CRC: the load must fail, not warm with garbage.
    source = template / "assets.extra" / "tf_serving_warmup_requests"
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF
    folder = tmp_path / "v"
    (folder / "assets.extra").mkdir(parents=True)
    (folder / "assets.extra" / "tf_serving_warmup_requests").write_bytes(bytes(data))
    with pytest.raises(WarmupFormatError):
        read_warmup(folder)


# --- the registry on real models ------------------------------------------------------


@pytest.mark.slow
def test_policies_and_labels_follow_models_config(template: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for v in (1, 2, 3):
        add_version(repo, "m", v, template)
    write_models_config(repo, config_entry("m", "latest { num_versions: 2 }"))
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        await registry.start()
        assert states(registry, "m") == {2: VersionState.AVAILABLE, 3: VersionState.AVAILABLE}
        assert registry.resolve(None).version == 3  # the newest by default

        # A canary: serve exactly 1 and 2, route by label.
        write_models_config(
            repo,
            config_entry("m", "specific { versions: 1 versions: 2 }", {"stable": 1, "canary": 2}),
        )
        await registry.poll_once()
        assert states(registry, "m") == {
            1: VersionState.AVAILABLE,
            2: VersionState.AVAILABLE,
            3: VersionState.END,
        }
        assert registry.resolve("m", label="stable").version == 1
        assert registry.resolve("m", label="canary").version == 2
        assert registry.resolve("m", version=1).version == 1
        assert registry.resolve("m").version == 1  # unlabelled: stable, not the newest
        assert registry.labels_of("m") == {"stable": 1, "canary": 2}
        assert registry.resolve("m", label="canary").version == 2
        out = await registry.resolve("m", label="stable").predict(IMAGES, None)
        assert out.shape == (2, 3)

        # Labels are re-read on every poll; one may point at a version not served.
        write_models_config(
            repo,
            config_entry("m", "specific { versions: 1 versions: 2 }", {"stable": 2, "canary": 3}),
        )
        await registry.poll_once()
        assert registry.resolve("m", label="stable").version == 2
        with pytest.raises(VersionNotFound, match=r"label 'canary' \(version 3\).*versions: 1, 2"):
            registry.resolve("m", label="canary")

        write_models_config(repo, config_entry("m", "all {}"))
        await registry.poll_once()
        assert set(states(registry, "m").values()) == {VersionState.AVAILABLE}

    run_with(registry, scenario)


@pytest.mark.slow
def test_resolve_errors_name_what_exists(template: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    add_version(repo, "m", 1, template)
    write_models_config(repo, config_entry("m", "latest {}", {"stable": 1}))
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        with pytest.raises(ModelNotReady, match="not been read yet"):
            registry.resolve(None)
        assert not registry.is_ready()
        await registry.start()
        assert registry.is_ready()
        assert registry.default_model == "m" and registry.model_names() == ["m"]
        with pytest.raises(ModelNotFound, match="no model named 'x'; models: m"):
            registry.resolve("x")
        with pytest.raises(ModelNotFound):
            registry.statuses("x")
        with pytest.raises(VersionNotFound, match=r"version 7 of model 'm' is not served.*: 1"):
            registry.resolve("m", version=7)
        with pytest.raises(VersionNotFound, match="no version 7; versions: 1"):
            registry.statuses("m", version=7)
        with pytest.raises(UnknownVersionLabel, match="no version label 'beta'; labels: stable"):
            registry.resolve("m", label="beta")
        with pytest.raises(InvalidRequest):
            registry.resolve("m", version=1, label="stable")

    run_with(registry, scenario)
    assert not registry.is_ready()  # stopped


@pytest.mark.slow
def test_hot_reload_keeps_every_request_and_survives_a_broken_version(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, settled: None
) -> None:
    repo = serving_one_version(template, tmp_path)
    factory = CountingFactory()
    registry = Registry(settings(repo, tmp_path), runtime_factory=factory)
    failures: list[str] = []

    async def scenario() -> None:
        await registry.start()
        stop = asyncio.Event()
        seen = {1: asyncio.Event(), 2: asyncio.Event()}

        async def traffic() -> None:
            # Like the data plane: resolve, then a thread hop (decoding), then predict.
            while not stop.is_set():
                try:
                    target = registry.resolve("m")
                    batch = await asyncio.to_thread(np.copy, IMAGES[:1])
                    out = await target.predict(batch, None)
                    assert out.shape == (1, 3)
                    seen[target.version].set()
                except Exception as exc:
                    failures.append(repr(exc))  # a repr: no traceback keeps a version alive
                    for event in (stop, *seen.values()):  # nobody waits forever
                        event.set()

        clients = [asyncio.create_task(traffic()) for _ in range(3)]
        try:
            await seen[1].wait()
            # A request that resolved v1 just before the switch, reaching the batcher after.
            late = registry.resolve("m")
            add_version(repo, "m", 2, template)
            poll = asyncio.create_task(registry.poll_once())
            await seen[2].wait()  # v2 is routed and answering
            assert registry.resolve("m").version == 2
            assert (await late.predict(IMAGES, None)).shape == (2, 3)
            assert not poll.done()  # v1 stays loaded while a request holds it
            del late
            await poll
        finally:
            stop.set()
            await asyncio.gather(*clients)
        assert failures == []
        assert states(registry, "m") == {1: VersionState.END, 2: VersionState.AVAILABLE}

        # A broken v3: reported, never displaces v2, not retried until its folder changes.
        broken = repo / "m" / "3"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"this is not a SavedModel")
        await registry.poll_once()
        v3 = registry.statuses("m", version=3)[0]
        assert v3.state == VersionState.END and v3.error_code != 0
        assert "SavedModel" in v3.error_message and "Traceback" not in v3.error_message
        assert "\n" not in v3.error_message
        assert registry.resolve("m").version == 2 and registry.is_ready()
        with pytest.raises(VersionNotFound, match="failed to load"):
            registry.resolve("m", version=3)
        loads = len(factory.paths)
        await registry.poll_once()
        assert len(factory.paths) == loads  # same folder: not retried
        (broken / "saved_model.pb").write_bytes(b"still not a SavedModel, but rewritten")
        await registry.poll_once()
        assert factory.paths[loads:] == [broken]
        assert registry.statuses("m", version=3)[0].state == VersionState.END

    with caplog.at_level(logging.WARNING, logger="service.registry"):
        run_with(registry, scenario)
    assert failures == []
    assert factory.paths[:2] == [repo / "m" / "1", repo / "m" / "2"]
    # Unloading waited for requests, not for the timeout that bounds that wait.
    assert "still in use" not in caplog.text


@pytest.mark.slow
def test_models_added_to_the_config_are_loaded_on_poll(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, settled: None
) -> None:
    repo = tmp_path / "repo"
    add_version(repo, "a", 1, template)
    write_models_config(repo, simple_config("a"))
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        await registry.start()  # readiness not asked yet: it holds without a probe

        # b is configured before it has a version: the server that served a stays ready
        # for it (b's own requests get 503); one bad entry took every replica out before.
        write_models_config(repo, simple_config("a", "b"))
        (repo / "b").mkdir()
        await registry.poll_once()
        assert registry.model_names() == ["a", "b"] and registry.default_model == "a"
        assert registry.is_ready()
        with pytest.raises(VersionNotFound, match="no version found to serve"):
            registry.resolve("b")
        assert registry.statuses("b") == []

        add_version(repo, "b", 1, template, labels=False)
        await registry.poll_once()
        assert registry.is_ready()
        # No labels.txt: class indices. (No local keeps a version: unloads wait for those.)
        assert registry.resolve("b").labels == ["0", "1", "2"]
        assert registry.resolve(None).labels == ["cat", "dog", "bird"]

        # A models.config broken mid-flight is ignored; what was served still is. Said
        # once, not every poll, and in a gauge.
        good = (repo / "models.config").read_text()
        (repo / "models.config").write_text("model_config_list { config { nme: 'a' } }")
        with caplog.at_level(logging.INFO, logger="service.registry"):
            for _ in range(3):
                await registry.poll_once()
            assert registry.model_names() == ["a", "b"] and registry.is_ready()
            assert metrics.REGISTRY.get_sample_value("cnnserve_models_config_ok") == 0
            (repo / "models.config").write_text(good)
            await registry.poll_once()
        assert caplog.text.count("ignoring models.config change") == 1, caplog.text
        assert "models.config reads again" in caplog.text
        assert metrics.REGISTRY.get_sample_value("cnnserve_models_config_ok") == 1

        # Removing a model unloads it.
        write_models_config(repo, simple_config("a"))
        await registry.poll_once()
        assert registry.model_names() == ["a"]
        with pytest.raises(ModelNotFound):
            registry.resolve("b")

    run_with(registry, scenario)


def test_a_broken_models_config_is_fatal_at_start(tmp_path: Path) -> None:
    (tmp_path / "models.config").write_text("model_config_list { config { nme: 'a' } }")
    registry = Registry(settings(tmp_path, tmp_path))
    with pytest.raises(ConfigError, match="nme"):
        run_with(registry, registry.start)


def test_a_deleted_serving_folder_keeps_serving_with_its_metadata_and_is_logged_once(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = serving_one_version(template, tmp_path)
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        await registry.start()
        shutil.rmtree(repo / "m" / "1")
        with caplog.at_level(logging.WARNING, logger="service.registry"):
            for _ in range(5):
                await registry.poll_once()
        kept = [r for r in caplog.records if "keeping version(s)" in r.getMessage()]
        assert len(kept) == 1, caplog.text  # once, not once per poll
        # Not "its requests are refused": they are served by the kept version.
        said = [r.getMessage() for r in caplog.records if "no version to serve" in r.getMessage()]
        assert len(said) == 1 and "the version it serves is kept" in said[0], said
        target = registry.resolve("m")
        assert target.version == 1 and states(registry, "m") == {1: VersionState.AVAILABLE}
        # Metadata comes from what was read at load, not from the deleted folder.
        assert "serving_default" in target.runtime.signature_defs().signature_def

    run_with(registry, scenario)


def test_a_version_a_specific_policy_names_stays_when_its_folder_goes(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """specific {1, 2} with stable=1: deleting 1's folder unloaded it at once although
    2 served, and every request for the stable label got 404 until it came back."""
    repo = tmp_path / "repo"
    for v in (1, 2):
        add_version(repo, "m", v, template)
    write_models_config(
        repo,
        simple_config(
            "m", policy="specific { versions: 1 versions: 2 }", labels={"stable": 1, "canary": 2}
        ),
    )
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        await registry.start()
        shutil.rmtree(repo / "m" / "1")
        with caplog.at_level(logging.WARNING, logger="service.registry"):
            for _ in range(3):
                await registry.poll_once()
        gone = [r for r in caplog.records if "the folder of version 1 is gone" in r.getMessage()]
        assert len(gone) == 1, caplog.text
        assert registry.resolve("m", label="stable").version == 1
        assert states(registry, "m") == {1: VersionState.AVAILABLE, 2: VersionState.AVAILABLE}
        # Taken out of the policy, it goes (the label moved with it).
        write_models_config(
            repo, simple_config("m", policy="specific { versions: 2 }", labels={"stable": 2})
        )
        await registry.poll_once()
        assert states(registry, "m") == {1: VersionState.END, 2: VersionState.AVAILABLE}

    run_with(registry, scenario)


def test_a_reload_config_that_drops_a_version_does_not_wait_for_itself(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """HandleReloadConfigRequest's own frame held the routing table while it waited for
    the rescan, so the version it dropped stayed "in use" until the request timeout
    bounded the wait (10 s a call by default; here 30 s, so the bound below fails it)."""
    repo = tmp_path / "repo"
    for v in (1, 2):
        add_version(repo, "m", v, template)
    write_models_config(repo, config_entry("m", "specific { versions: 1 versions: 2 }"))
    registry = Registry(settings(repo, tmp_path).model_copy(update={"reload_config_rpc": True}))

    async def scenario() -> None:
        await registry.start()
        text = f"model_config_list {{ {config_entry('m', 'specific { versions: 2 }')} }}"
        await asyncio.wait_for(registry.reload_config(text), 20)
        assert states(registry, "m") == {1: VersionState.END, 2: VersionState.AVAILABLE}

    with caplog.at_level(logging.WARNING, logger="service.registry"):
        run_with(registry, scenario)
    assert "still in use" not in caplog.text


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ('config { name: "m" base_path: "/models/m" }', "names no model_platform"),
        ('config { name: "m" model_platform: "tensorflow" }', "has no base_path"),
        (
            'config { name: "m" base_path: "m" model_platform: "tensorflow" }',
            "has a relative base_path 'm'",
        ),
    ],
)
def test_a_reload_config_tf_serving_refuses_is_refused(
    template: Path, tmp_path: Path, entry: str, words: str
) -> None:
    """TF Serving answers such a HandleReloadConfigRequest INVALID_ARGUMENT; a file on
    disk the gateway only warns of, but the call must not succeed here and not there."""
    repo = tmp_path / "repo"
    add_version(repo, "m", 1, template)
    write_models_config(repo, config_entry("m", "latest { num_versions: 1 }"))
    before = (repo / "models.config").read_text()
    registry = Registry(settings(repo, tmp_path).model_copy(update={"reload_config_rpc": True}))
    with pytest.raises(InvalidRequest, match=words):
        asyncio.run(registry.reload_config(f"model_config_list {{ {entry} }}"))
    assert (repo / "models.config").read_text() == before


def test_a_model_with_nothing_to_serve_is_logged_once(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """models.config naming a model without version folders kept the server unready
    with no word why."""
    repo = tmp_path / "repo"
    add_version(repo, "m", 1, template)
    write_models_config(
        repo, config_entry("m", "latest { num_versions: 1 }") + config_entry("ghost", "latest {}")
    )
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        await registry.start()
        await registry.poll_once()
        assert not registry.is_ready()

    with caplog.at_level(logging.WARNING, logger="service.registry"):
        run_with(registry, scenario)
    said = [r.getMessage() for r in caplog.records if "no version to serve" in r.getMessage()]
    assert len(said) == 1 and "ghost" in said[0] and "no numbered folders" in said[0], said


@pytest.mark.slow
def test_a_version_fixed_in_place_is_retried_and_a_bad_card_fails_its_load(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client import REGISTRY

    def failures() -> float:
        labels = {"model": "m", "event": "load_failed"}
        return REGISTRY.get_sample_value("cnnserve_model_events_total", labels) or 0.0

    repo = tmp_path / "repo"
    add_version(repo, "m", 1, template)
    write_models_config(repo, simple_config("m", policy="all {}"))
    registry = Registry(settings(repo, tmp_path), runtime_factory=CountingFactory())

    async def scenario() -> None:
        await registry.start()
        # Version 2 ships a card that is not JSON: refused, not served with defaults.
        v2 = add_version(repo, "m", 2, template)
        (v2 / "assets.extra" / "model_card.json").write_text('{"preprocessing": ')
        # Version 3 ships two labels for three classes.
        v3 = add_version(repo, "m", 3, template)
        labels = v3 / "assets.extra" / "labels.txt"
        labels.write_text("cat\ndog\n")
        failed = failures()
        with caplog.at_level(logging.ERROR, logger="service.registry"):
            await registry.poll_once()
        assert failures() == failed + 2
        status = registry.statuses("m", version=2)[0]
        assert status.state == VersionState.END and "unreadable model card" in status.error_message
        assert "version 2 failed to load" in caplog.text
        assert "2 labels" in registry.statuses("m", version=3)[0].error_message
        # Fixed in place (the folders' own stats unchanged): retried and served.
        shutil.copy(template / "assets.extra" / "labels.txt", labels)
        await registry.poll_once()
        assert states(registry, "m")[3] == VersionState.AVAILABLE
        assert registry.resolve("m", version=3).labels == ["cat", "dog", "bird"]
        assert states(registry, "m")[2] == VersionState.END

    run_with(registry, scenario)


def _edit_card(version: Path, **fields: Any) -> None:
    path = version / "assets.extra" / "model_card.json"
    card = json.loads(path.read_text())
    for key, value in fields.items():
        if isinstance(value, dict):
            card[key] = {**card[key], **value}
        else:
            card[key] = value
    path.write_text(json.dumps(card))


def test_a_served_version_changed_in_place_keeps_serving_and_says_so_once(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder replaced under its number is not reloaded (as in TF Serving), but a
    worker starting afresh would load the new files: the replica answered as version 1
    from two models without a word (an outside audit, 12-07)."""
    repo = serving_one_version(template, tmp_path)
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        await registry.start()
        served = registry.resolve("m")
        with caplog.at_level(logging.WARNING, logger="service.registry"):
            await registry.poll_once()
            assert "changed since it was loaded" not in caplog.text
            (repo / "m" / "1" / "assets.extra" / "labels.txt").write_text("a\nb\nc\n")
            for _ in range(3):
                await registry.poll_once()
        said = [r.getMessage() for r in caplog.records if "changed since" in r.getMessage()]
        assert len(said) == 1 and "m version 1: its folder" in said[0], said
        assert "publish a change as a new version number" in said[0]
        assert registry.resolve("m") is served  # what it loaded, still

    run_with(registry, scenario)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            lambda v: (v / "assets.extra" / "labels.txt").write_text("dog\ncat\nbird\n"),
            "class 0 is 'cat' in the card, 'dog' in labels.txt",
        ),
        (lambda v: _edit_card(v, labels=["x", "x"]), "it names 2 classes, labels.txt 3"),
        (lambda v: _edit_card(v, preprocessing="x"), "preprocessing is a JSON str"),
        (lambda v: _edit_card(v, preprocessing={"color": "CMYK"}), "color 'CMYK'"),
        (
            lambda v: (v / "assets.extra" / "labels.txt").write_text("cat\n  \nbird\n"),
            "line 2 is empty",
        ),
    ],
    ids=["labels-swapped", "card-labels", "preprocessing-string", "cmyk", "blank-label"],
)
def test_a_version_whose_card_and_labels_disagree_never_serves(
    template: Path, tmp_path: Path, change: Callable[[Path], object], said: str
) -> None:
    """Each was loaded and served without a word (an outside audit, 12-07): with two lines
    of labels.txt swapped, a trouser was answered "T-shirt/top"."""
    repo = serving_one_version(template, tmp_path)
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        await registry.start()
        change(add_version(repo, "m", 2, template))
        await registry.poll_once()
        assert registry.resolve("m").version == 1
        status = registry.statuses("m", version=2)[0]
        assert status.state == VersionState.END and said in status.error_message, status

    run_with(registry, scenario)


def broken_version(repo: Path, version: int, template: Path) -> None:
    path = add_version(repo, "m", version, template)
    (path / "saved_model.pb").write_bytes(b"not a SavedModel")


def test_a_fresh_start_after_a_broken_publish_serves_the_newest_version_that_loads(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """latest {1} with version 3 broken and 2 good: a running worker keeps what it
    served; a fresh one (a worker respawned, a restart) had nothing to keep and served
    nothing. It falls back to 2, not to 1, and says so; a good 4 replaces it."""
    repo = tmp_path / "repo"
    for version in (1, 2):
        add_version(repo, "m", version, template)
    broken_version(repo, 3, template)
    write_models_config(repo, simple_config("m"))
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        with caplog.at_level(logging.WARNING, logger="service.registry"):
            await registry.start()
        assert registry.resolve("m").version == 2 and registry.is_ready()
        assert states(registry, "m") == {2: VersionState.AVAILABLE, 3: VersionState.END}
        assert "serving version 2, the newest that loads, because version(s) 3" in caplog.text
        await registry.poll_once()  # 3 is not retried, 2 stays
        assert registry.resolve("m").version == 2
        add_version(repo, "m", 4, template)
        await registry.poll_once()
        assert registry.resolve("m").version == 4
        assert states(registry, "m")[2] == VersionState.END

    run_with(registry, scenario)


def test_a_label_moved_to_a_version_that_failed_is_a_warning(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The label stays on the old version for good (a failed version is not retried
    until its folder changes): said once as a warning, not as "until it is available"."""
    repo = tmp_path / "repo"
    add_version(repo, "m", 1, template)
    broken_version(repo, 2, template)
    policy = "specific { versions: 1 versions: 2 }"
    write_models_config(repo, simple_config("m", policy=policy, labels={"canary": 1}))
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        await registry.start()
        write_models_config(repo, simple_config("m", policy=policy, labels={"canary": 2}))
        with caplog.at_level(logging.INFO, logger="service.registry"):
            for _ in range(3):
                await registry.poll_once()
        held = [r for r in caplog.records if "label 'canary' stays on version 1" in r.getMessage()]
        assert len(held) == 1 and held[0].levelno == logging.WARNING, caplog.text
        assert "version 2 failed to load" in held[0].getMessage()
        assert registry.resolve("m", label="canary").version == 1

    run_with(registry, scenario)


def test_a_label_on_a_version_that_will_not_serve_is_a_warning_once(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its requests get 404; nothing said so (an outside review: `canary: 42` on a
    specific policy of version 1, cnnserve_version_label showing it set)."""
    repo = tmp_path / "repo"
    add_version(repo, "m", 1, template)
    broken_version(repo, 2, template)
    policy = "specific { versions: 1 versions: 2 }"
    labels = {"stable": 1, "canary": 42, "broken": 2}
    write_models_config(repo, simple_config("m", policy=policy, labels=labels))
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        with caplog.at_level(logging.WARNING, logger="service.registry"):
            await registry.start()
            for _ in range(2):
                await registry.poll_once()
        said = [r.getMessage() for r in caplog.records if "points at version" in r.getMessage()]
        assert len(said) == 2, said  # once each, not every poll; stable serves
        assert any("'canary' points at version 42, which has no folder" in m for m in said)
        assert any("'broken' points at version 2, which failed to load" in m for m in said)

    run_with(registry, scenario)


def test_a_label_moved_before_its_version_is_published_stays_until_it_serves(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """models.config moved `stable` to version 2 and listed it, one edit, before version
    2's folder came (a ConfigMap and a sync job): stable's requests got 404 until the
    folder came, then 503 while it loaded. The label now waits on version 1."""
    repo = tmp_path / "repo"
    add_version(repo, "m", 1, template)
    write_models_config(
        repo, simple_config("m", policy="specific { versions: 1 }", labels={"stable": 1})
    )
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        await registry.start()
        moved = simple_config(
            "m", policy="specific { versions: 1 versions: 2 }", labels={"stable": 2}
        )
        write_models_config(repo, moved)
        with caplog.at_level(logging.INFO, logger="service.registry"):
            await registry.poll_once()
            assert registry.resolve("m", label="stable").version == 1
            assert (
                "label 'stable' stays on version 1 until version 2 is available "
                f"(no folder {repo / 'm' / '2'} yet)" in caplog.text
            )
            add_version(repo, "m", 2, template)
            await registry.poll_once()
        assert registry.resolve("m", label="stable").version == 2
        # A label on a version the policy would not serve even with its folder: at once.
        write_models_config(
            repo,
            simple_config("m", policy="specific { versions: 1 versions: 2 }", labels={"stable": 7}),
        )
        await registry.poll_once()
        with pytest.raises(VersionNotFound, match=r"label 'stable' \(version 7\)"):
            registry.resolve("m", label="stable")

    run_with(registry, scenario)


@pytest.mark.parametrize("target", ["unpublished", "broken"])
def test_a_label_moved_in_the_edit_that_drops_its_version_stays_on_it_until_it_moves(
    target: str, template: Path, tmp_path: Path
) -> None:
    """The usual one-step edit moves a label and drops its old version from the policy
    (policy {2, 3} canary 3, from {1, 2} canary 1): version 1 was unloaded at once (2
    serves), and the label's requests got 404 until version 3 served, for good when 3
    failed to load (an outside audit, 12-07). The label's version stays loaded while
    the label is on it, and goes once the label moves."""
    repo = tmp_path / "repo"
    for version in (1, 2):
        add_version(repo, "m", version, template)
    if target == "broken":
        broken_version(repo, 3, template)
    before = simple_config("m", policy="specific { versions: 1 versions: 2 }", labels={"canary": 1})
    write_models_config(repo, before)
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        await registry.start()
        after = simple_config(
            "m", policy="specific { versions: 2 versions: 3 }", labels={"canary": 3}
        )
        write_models_config(repo, after)
        for _ in range(2):
            await registry.poll_once()
            assert registry.resolve("m", label="canary").version == 1
            assert states(registry, "m")[1] == VersionState.AVAILABLE
        if target == "broken":
            assert states(registry, "m")[3] == VersionState.END
            return
        add_version(repo, "m", 3, template)
        await registry.poll_once()
        assert registry.resolve("m", label="canary").version == 3
        assert states(registry, "m")[1] == VersionState.END  # gone once the label moved

    run_with(registry, scenario)


def test_a_held_label_does_not_let_the_other_served_versions_go(
    template: Path, tmp_path: Path
) -> None:
    """The version a held label stays on is no wanted one: counted as one, it let the
    policy's unwanted versions go before any wanted version served (specific {1, 2}
    canary 1, edited to specific {3} canary 3: version 2 went, and unlabelled requests
    moved from 2 to the old canary 1; the review of 12-07)."""
    repo = tmp_path / "repo"
    for version in (1, 2):
        add_version(repo, "m", version, template)
    policy = "specific { versions: 1 versions: 2 }"
    write_models_config(repo, simple_config("m", policy=policy, labels={"canary": 1}))
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        await registry.start()
        moved = simple_config("m", policy="specific { versions: 3 }", labels={"canary": 3})
        write_models_config(repo, moved)
        await registry.poll_once()
        assert registry.resolve("m").version == 2  # unlabelled: as before the edit
        assert registry.resolve("m", label="canary").version == 1
        add_version(repo, "m", 3, template)
        await registry.poll_once()
        assert registry.resolve("m").version == 3
        assert {v for v, s in states(registry, "m").items() if s == VersionState.AVAILABLE} == {3}

    run_with(registry, scenario)


def test_a_version_published_since_the_last_poll_is_not_ready_not_missing(
    template: Path, tmp_path: Path
) -> None:
    """Each worker polls on its own: a client that saw version 2 AVAILABLE (from a
    sibling) and asked this worker for it got 404, which TF Serving's clients take as
    final. A version the policy would not serve is still a 404."""
    repo = serving_one_version(template, tmp_path)
    registry = Registry(settings(repo, tmp_path))

    async def scenario() -> None:
        await registry.start()
        add_version(repo, "m", 2, template)  # not polled yet
        with pytest.raises(ModelNotReady, match="published moments ago"):
            registry.resolve("m", version=2)
        with pytest.raises(VersionNotFound):
            registry.resolve("m", version=7)
        await registry.poll_once()
        assert registry.resolve("m", version=2).version == 2
        with pytest.raises(VersionNotFound):  # latest {1}: 1 left, and stays a 404
            registry.resolve("m", version=1)

    run_with(registry, scenario)


class HangingFactory:
    """create_runtime whose load of version 2 hangs until released (a read of a stuck
    network file system), recording what was unloaded."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.unloaded: list[Path] = []
        self.late_unloaded = threading.Event()

    def __call__(self, name: str, version_dir: Path, **kwargs: Any) -> Runtime:
        if version_dir.name == "2":
            assert self.release.wait(30)
        runtime = create_runtime(name, version_dir, **kwargs)
        real_unload = runtime.unload

        def unload() -> None:
            self.unloaded.append(version_dir)
            real_unload()
            if version_dir.name == "2":
                self.late_unloaded.set()

        runtime.unload = unload  # type: ignore[method-assign]
        return runtime


def test_a_load_that_hangs_times_out_and_later_versions_still_load(
    template: Path, tmp_path: Path
) -> None:
    """Every poll waited for each load: one that never returned (a FIFO in place of a
    card, standing in for a hung network read) held up every later version, of every
    model, with no word, until a restart."""
    repo = serving_one_version(template, tmp_path)
    factory = HangingFactory()
    patient = settings(repo, tmp_path)
    registry = Registry(patient, runtime_factory=factory)

    async def scenario() -> None:
        await registry.start()
        # A short timeout for the hanging load only: a real one can take longer than it.
        registry._settings = patient.model_copy(update={"load_timeout_seconds": 0.5})
        add_version(repo, "m", 2, template)
        await registry.poll_once()
        registry._settings = patient
        status = registry.statuses("m", version=2)[0]
        assert status.state == VersionState.END
        assert "did not load within 0.5 s (CNNSERVE_LOAD_TIMEOUT_SECONDS)" in status.error_message
        assert registry.resolve("m").version == 1  # still served
        add_version(repo, "m", 3, template)
        await registry.poll_once()
        assert registry.resolve("m").version == 3
        factory.release.set()  # the hung read returns: what it loaded is unloaded
        assert await asyncio.to_thread(factory.late_unloaded.wait, 60)
        assert registry.resolve("m").version == 3

    run_with(registry, scenario)


class UnreadableFactory:
    """create_runtime for a version one of whose files the server may not read."""

    def __call__(self, name: str, version_dir: Path, **kwargs: Any) -> Runtime:
        denied = version_dir / "saved_model.pb"
        raise PermissionError(13, "Permission denied", str(denied))


def test_an_unreadable_version_is_one_line_and_internal(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A version with a file the server may not read (chmod 000, which root ignores:
    hence the factory) was reported UNKNOWN "PermissionError: …" with a 35-line
    traceback, as if cnnserve had a bug; other damaged versions are one line."""
    repo = serving_one_version(template, tmp_path)
    registry = Registry(settings(repo, tmp_path), runtime_factory=UnreadableFactory())

    async def scenario() -> None:
        await registry.start()

    with caplog.at_level(logging.ERROR, logger="service.registry"):
        run_with(registry, scenario)
    (status,) = registry.statuses("m")
    assert status.state == VersionState.END
    assert status.error_code == grpc_code("INTERNAL"), status
    assert (
        status.error_message
        == f"cannot read {repo / 'm' / '1' / 'saved_model.pb'}: Permission denied"
    )
    failed = [r for r in caplog.records if "failed to load" in r.getMessage()]
    assert len(failed) == 1 and not failed[0].exc_info, caplog.text


def grpc_code(name: str) -> int:
    import grpc

    return int(getattr(grpc.StatusCode, name).value[0])


class FlakyFactory:
    """create_runtime for version 2, which fails with ``error`` the first time."""

    def __init__(self, error: OSError) -> None:
        self.error = error
        self.calls = 0

    def __call__(self, name: str, version_dir: Path, **kwargs: Any) -> Runtime:
        if version_dir.name == "2":
            self.calls += 1
            if self.calls == 1:
                raise self.error
        return create_runtime(name, version_dir, **kwargs)


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (OSError(errno.EIO, "Input/output error", "shard"), True),
        (PermissionError(errno.EACCES, "Permission denied", "shard"), False),
    ],
    ids=["transient", "a-file-to-mend"],
)
def test_a_load_that_failed_for_a_passing_cause_is_tried_again_later(
    template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError, retried: bool
) -> None:
    """Retried only once its folder changed, a version whose network file system came
    back (EIO, a read that hung) stayed END for good while an older one served; TF
    Serving retries loads. A failure a person must mend (permissions) waits for them."""
    monkeypatch.setattr(registry_module, "RETRY_LOAD_SECONDS", 0.0)
    repo = serving_one_version(template, tmp_path)
    factory = FlakyFactory(error)
    registry = Registry(settings(repo, tmp_path), runtime_factory=factory)

    async def scenario() -> None:
        await registry.start()
        add_version(repo, "m", 2, template)
        await registry.poll_once()
        status = registry.statuses("m", version=2)[0]
        assert status.state == VersionState.END
        assert ("tried again in 0 s" in status.error_message) is retried
        await registry.poll_once()  # the folder is as it was
        assert registry.resolve("m").version == (2 if retried else 1)

    run_with(registry, scenario)
    assert factory.calls == (2 if retried else 1)


def test_a_broken_savedmodel_under_auto_is_one_error_line(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated saved_model.pb logged a WARNING that the LiteRT artifact "was made
    from another SavedModel" and that it was "loading it with TensorFlow instead", then
    the ERROR: only the ERROR says what is wrong."""
    repo = serving_one_version(template, tmp_path)
    registry = Registry(settings(repo, tmp_path).model_copy(update={"runtime": "auto"}))

    async def scenario() -> None:
        await registry.start()
        broken = add_version(repo, "m", 2, template)
        pb = broken / "saved_model.pb"
        pb.write_bytes(pb.read_bytes()[:100])
        with caplog.at_level(logging.WARNING):
            await registry.poll_once()
        assert registry.statuses("m", version=2)[0].state == VersionState.END

    run_with(registry, scenario)
    said = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING
        and ("version 2" in r.getMessage() or "/2:" in r.getMessage())
    ]
    assert [r.levelname for r in said] == ["ERROR"], [r.getMessage() for r in said]


@pytest.mark.parametrize("damage", ["garbage saved_model.pb", "no variables"])
def test_a_broken_savedmodel_beside_its_verified_artifact_is_one_error_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """Its card records the SavedModel the artifact was made from, which a broken one
    no longer matches: a WARNING that the artifact "was made from another SavedModel"
    came first, then the ERROR. The warning is said once a version loads, not before."""
    template = publish_tiny(tmp_path / "template", "m", with_litert=True)
    repo = serving_one_version(template, tmp_path)
    registry = Registry(settings(repo, tmp_path).model_copy(update={"runtime": "auto"}))

    async def scenario() -> None:
        await registry.start()
        broken = add_version(repo, "m", 2, template)
        if damage == "no variables":
            shutil.rmtree(broken / "variables")
        else:
            (broken / "saved_model.pb").write_bytes(random.Random(0).randbytes(200_000))
        with caplog.at_level(logging.WARNING):
            await registry.poll_once()
        assert registry.statuses("m", version=2)[0].state == VersionState.END

    run_with(registry, scenario)
    said = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "/2" in r.getMessage()
    ]
    assert len(said) == 1 and "failed to load" in said[0], said


def test_an_artifact_beside_another_savedmodel_is_said_once_the_version_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    template = publish_tiny(tmp_path / "template", "m", with_litert=True)
    other = publish_tiny(tmp_path / "other", "m", seed=1)
    repo = serving_one_version(template, tmp_path)
    registry = Registry(settings(repo, tmp_path).model_copy(update={"runtime": "auto"}))

    async def scenario() -> None:
        await registry.start()
        replaced = add_version(repo, "m", 2, template)
        shutil.rmtree(replaced / "variables")
        shutil.copytree(other / "variables", replaced / "variables")
        shutil.copy2(other / "saved_model.pb", replaced / "saved_model.pb")
        with caplog.at_level(logging.WARNING):
            await registry.poll_once()
        assert registry.resolve("m").version == 2  # converted afresh, served

    run_with(registry, scenario)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("was made from another SavedModel" in m for m in said) == 1, said
