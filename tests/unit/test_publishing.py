"""A version is published whole or not at all, and never overwrites another."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service import publishing
from service.publishing import STALE_TMP_SECONDS, TMP_PREFIX, publish_version
from service.repository import version_dirs

ROOT = Path(__file__).resolve().parents[2]


def _write_marker(text: str):  # type: ignore[no-untyped-def]
    def write(tmp: Path) -> None:
        (tmp / "saved_model.pb").write_text(text)
        (tmp / "assets.extra").mkdir()
        (tmp / "assets.extra" / "labels.txt").write_text("a\nb\n")

    return write


def test_versions_count_up_and_existing_ones_are_untouched(tmp_path: Path) -> None:
    first = publish_version(tmp_path, _write_marker("one"))
    second = publish_version(tmp_path, _write_marker("two"))
    assert (first.name, second.name) == ("1", "2")
    assert (first / "saved_model.pb").read_text() == "one"
    assert (second / "saved_model.pb").read_text() == "two"


def test_a_failed_export_leaves_nothing(tmp_path: Path) -> None:
    def broken(tmp: Path) -> None:
        (tmp / "saved_model.pb").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_version(tmp_path, broken)
    assert list(tmp_path.iterdir()) == []


KILLED_EXPORT = """
import os, signal, sys
from pathlib import Path
from service.publishing import publish_version

def write(tmp):
    (tmp / "saved_model.pb").write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)   # dies mid-export, like an OOM kill

publish_version(Path(sys.argv[1]), write)
"""


def test_a_killed_export_leaves_no_version_and_is_cleaned_up(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(tmp_path)], cwd=ROOT)
    assert proc.returncode == -9
    assert version_dirs(tmp_path) == {}
    [leftover] = tmp_path.iterdir()
    # Named by its host and pid: only a publisher on the same host judges the pid.
    assert leftover.name.startswith(f"{TMP_PREFIX}{publishing._host()}-")
    assert leftover.name.split("-")[-2] != str(os.getpid())  # the killed child's pid
    # The next export removes the dead one's leftovers and takes version 1.
    assert publish_version(tmp_path, _write_marker("next")).name == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]


CONCURRENT_EXPORT = """
import sys
from pathlib import Path
from service.publishing import publish_version

def write(tmp):
    for i in range(50):
        (tmp / f"part{i}").write_text(sys.argv[2])
    (tmp / "saved_model.pb").write_text(sys.argv[2])

print(publish_version(Path(sys.argv[1]), write).name)
"""


def test_concurrent_exports_get_distinct_versions(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_EXPORT, str(tmp_path), f"writer{i}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    versions = [p.communicate(timeout=240)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(versions) == ["1", "2", "3", "4"]
    writers = {(tmp_path / v / "saved_model.pb").read_text() for v in versions}
    assert writers == {"writer0", "writer1", "writer2", "writer3"}


def test_only_int64_folder_names_are_versions(tmp_path: Path) -> None:
    # TF Serving parses version folders as int64 (0 too) and ignores the rest.
    # 250 digits: fine as a file name, and past int64 as well (4,301 raised from int()).
    names = ("0", "1", "12", str(2**63 - 1), str(2**63), "9" * 20, "9" * 250, "-3", "a1")
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a version")
    assert sorted(version_dirs(tmp_path)) == [0, 1, 12, 2**63 - 1]


def test_folders_of_one_number_are_one_version_told_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ "16" and "0016" both name version 16: the folders' order on disk chose one,
    silently (a broken "16" beside a good "0016" was never tried, never named)."""
    for name in ("0016", "016", "16", "07", "007"):
        (tmp_path / name).mkdir()
    for _ in range(2):
        found = version_dirs(tmp_path)
        assert {v: p.name for v, p in found.items()} == {16: "16", 7: "007"}
    told = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sorted(told) == [
        f"{tmp_path}: folders 0016, 016 also name version 16; 16 is the one a load of it "
        "reads, the others are ignored (a copy of the version loaded already from one of "
        "them serves on, as in TF Serving, until a restart loads 16): rename or remove them",
        f"{tmp_path}: folders 07 also name version 7; 007 is the one a load of it reads, "
        "the others are ignored (a copy of the version loaded already from one of them "
        "serves on, as in TF Serving, until a restart loads 007): rename or remove them",
    ]


def test_an_entry_named_as_a_version_that_is_no_folder_is_told_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file, a link to nothing, a link loop: ignored, and said nowhere (an outside
    review), where an empty folder is a version that fails to load."""
    (tmp_path / "8").write_text("hi")
    (tmp_path / "9").symlink_to(tmp_path / "9")
    (tmp_path / "11").symlink_to(tmp_path / "nowhere")
    (tmp_path / "10").mkdir()
    for _ in range(2):
        assert list(version_dirs(tmp_path)) == [10]
    told = sorted(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert told == [
        f"{tmp_path / name} names version {name} but is not a folder (a file, or a link to "
        "none); it is ignored: publish a version as a folder"
        for name in ("11", "8", "9")
    ]


def test_the_version_after_a_version_0_is_1(tmp_path: Path) -> None:
    (tmp_path / "0").mkdir()
    published = publish_version(tmp_path, lambda tmp: (tmp / "saved_model.pb").write_text("x"))
    assert published.name == "1"


def test_a_stray_entry_named_like_the_next_version_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "1").touch()  # not a version, but no folder can be renamed onto it
    assert publish_version(tmp_path, _write_marker("one")).name == "2"
    (tmp_path / "3").touch()
    (tmp_path / "4").mkdir()  # an empty (half-copied) version folder: not replaced
    assert publish_version(tmp_path, _write_marker("two")).name == "5"
    assert (tmp_path / "1").is_file() and (tmp_path / "3").is_file()
    assert list((tmp_path / "4").iterdir()) == []
    # A file that takes the chosen number between the choice and the rename: skipped too.
    real = publishing._next_number
    raced = False

    def next_number(model_dir: Path) -> int:
        nonlocal raced
        if raced:
            return real(model_dir)
        raced = True
        (model_dir / "6").touch()
        return 6

    monkeypatch.setattr(publishing, "_next_number", next_number)
    assert publish_version(tmp_path, _write_marker("three")).name == "7"
    assert (tmp_path / "6").is_file()
    assert (tmp_path / "7" / "saved_model.pb").read_text() == "three"


def _dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(child.stdout)


def test_only_exports_known_dead_or_a_day_old_are_cleaned_up(tmp_path: Path) -> None:
    # A shared volume (ReadWriteMany): another host's pid says nothing about this one's.
    host, dead, alive = publishing._host(), _dead_pid(), os.getpid()
    day_old = time.time() - STALE_TMP_SECONDS - 60
    folders = {
        f"{TMP_PREFIX}{host}-{dead}-aaaaaaaa": False,  # killed here
        f"{TMP_PREFIX}{host}-{alive}-bbbbbbbb": True,  # in progress here
        f"{TMP_PREFIX}other-host.example-{dead}-cccccccc": True,  # in progress elsewhere?
        f"{TMP_PREFIX}{dead}-dddddddd": True,  # old name: which host, nobody knows
        f"{TMP_PREFIX}not-ours": True,
    }
    old = {
        f"{TMP_PREFIX}other-host.example-{alive}-eeeeeeee": False,  # a day old: dead
        f"{TMP_PREFIX}{alive}-ffffffff": False,
        f"{TMP_PREFIX}{host}-{alive}-99999999": False,
    }
    for name in {**folders, **old}:
        (tmp_path / name).mkdir()
        (tmp_path / name / "saved_model.pb").write_text("half")
    for name in old:
        os.utime(tmp_path / name, (day_old, day_old))
    assert publish_version(tmp_path, _write_marker("next")).name == "1"
    kept = {p.name for p in tmp_path.iterdir()} - {"1"}
    assert kept == {name for name, keep in {**folders, **old}.items() if keep}
