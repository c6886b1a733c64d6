"""`cnnserve data audit` on a generated dataset with planted label errors and planted
cross-split near duplicates, then `--fix` and the corrections it writes."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from service.training.audit import AuditConfig
from service.training.data import _bucket
from service.training.sources import SPLIT_NAMES, load_splits
from tests.helpers.images import write_class_folders, write_noisy_class_folders

pytestmark = pytest.mark.slow


def split_of(data: bytes) -> str:
    """The split a folder source's image gets in the audit (its default fractions)."""
    cfg = AuditConfig()
    edges = np.cumsum((1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction))
    bucket = _bucket(hashlib.sha256(data).hexdigest(), cfg.seed)
    return SPLIT_NAMES[int(np.searchsorted(edges, bucket, side="right"))]


class Audited:
    def __init__(self, root: Path) -> None:
        self.data = root / "data"
        self.output = root / "audit"
        self.mislabelled, self.pairs = write_noisy_class_folders(self.data, split_of=split_of)
        progress = io.StringIO()
        with contextlib.redirect_stderr(progress):
            code = main(
                ["data", "audit", str(self.data), "--output", str(self.output), "--epochs", "12"]
            )
        assert code == 0
        self.progress = progress.getvalue()
        self.report = json.loads((self.output / "audit.json").read_text())

    def rows(self, name: str) -> list[dict[str, str]]:
        with (self.output / name).open(newline="") as fh:
            return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Audited:
    return Audited(tmp_path_factory.mktemp("audit"))


def test_planted_label_errors_are_the_top_suspects(audited: Audited) -> None:
    planted = {str(p): p for p in audited.mislabelled}
    assert len(planted) == 10  # 5% of 200
    rows = audited.rows("label_issues.csv")
    top = rows[: 2 * len(planted)]
    hits = [r for r in top if r["id"] in planted]
    assert len(hits) >= 0.7 * len(planted)
    # The suggestion is the class the picture shows (its colour: file number mod 4).
    for row in hits:
        assert row["suggested_label"] == f"class_{int(Path(row['id']).stem) % 4}"
    labels = audited.report["label_issues"]
    assert 0.85 < labels["estimated_label_accuracy"] < 0.99
    assert labels["meets_target"] is False


def test_planted_cross_split_near_duplicates_are_found(audited: Audited) -> None:
    assert len(audited.pairs) == 3
    found = {
        frozenset((r["a"], r["b"])): r
        for r in audited.rows("duplicates.csv")
        if r["kind"] == "near"
    }
    for original, copy in audited.pairs:
        row = found[frozenset((str(original), str(copy)))]
        assert row["cross_split"] == "True" and row["split_a"] != row["split_b"]
    assert len(found) <= len(audited.pairs) + 2  # distinct pictures are not reported
    assert audited.report["duplicates"]["cross_split_pairs"] >= 3


def test_summary_links_its_pictures_and_progress_was_shown(audited: Audited) -> None:
    summary = (audited.output / "summary.md").read_text()
    for png in ("class_balance.png", "label_issues.png", "duplicates.png"):
        assert f"]({png})" in summary
        assert (audited.output / png).stat().st_size > 5000
    balance = audited.report["balance"]
    assert sum(balance["total"]) == 203  # 200 images and 3 planted copies
    assert sum(sum(counts) for counts in balance["per_split"].values()) == 203
    assert balance["imbalance_ratio"] >= 1.0
    assert "fold 4/4" in audited.progress and "near duplicates" in audited.progress


def test_fix_turns_reviewed_rows_into_corrections_training_applies(
    audited: Audited, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = audited.rows("label_issues.csv")
    planted = {str(p) for p in audited.mislabelled}
    reviewed = [dict(r, corrected_label=r["suggested_label"]) for r in rows if r["id"] in planted]
    reviewed_csv = tmp_path / "reviewed.csv"
    with reviewed_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([*reviewed, dict(rows[-1], corrected_label="")])  # blank: skipped
    fixed = tmp_path / "fixed"
    args = ["data", "audit", str(audited.data), "--output", str(fixed), "--fix", str(reviewed_csv)]
    assert main(args) == 0
    corrections = json.loads((fixed / "relabel.json").read_text())["corrections"]
    assert len(corrections) == len(reviewed)

    before = {p: p.read_bytes() for p in audited.mislabelled}
    splits = load_splits(
        [str(audited.data)],
        data_dir=Path("/x"),
        relabel=fixed / "relabel.json",
        val_fraction=0.1,
        test_fraction=0.1,
        seed=0,
    )
    labels = {
        h: split.class_names[label]
        for split in (splits.train, splits.validation, splits.test)
        for h, label in zip(split.hashes(), split.labels.tolist(), strict=True)
    }
    for row in reviewed:
        assert labels[row["sha256"]] == row["corrected_label"]
    assert all(p.read_bytes() == data for p, data in before.items())  # sources untouched

    # Every bad row is named at once (it stopped at the first).
    reviewed_csv.write_text(
        "sha256,corrected_label\n"
        + f"{rows[0]['sha256']},no_such_class\n"
        + f"{'0' * 64},{rows[0]['suggested_label']}\n"
        + f",{rows[0]['suggested_label']}\n"
        # One image corrected two ways: the last row won, unsaid.
        + f"{rows[1]['sha256']},{rows[1]['suggested_label']}\n"
        + f"{rows[1]['sha256']},{rows[1]['given_label']}\n"
    )
    assert main(args) == 2
    err = capsys.readouterr().err
    assert ":2: 'no_such_class' is not a class" in err
    assert ":3: no image of these sources has that sha256" in err
    assert ":4: the sha256 column is empty" in err
    assert (
        f":6: corrects the image of row 5 to {rows[1]['given_label']!r}, that row to "
        f"{rows[1]['suggested_label']!r}; keep one"
    ) in err
    # A folder for the reviewed file: said so (it read "do not exist").
    folder = ["data", "audit", str(audited.data), "--output", str(fixed), "--fix", str(tmp_path)]
    assert main(folder) == 2
    assert f"reviewed corrections {tmp_path} are a folder; give the CSV file" in (
        capsys.readouterr().err
    )


def test_fix_names_a_reviewed_file_that_is_not_utf8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A spreadsheet saved in its own format (or UTF-16) was a UnicodeDecodeError traceback."""
    data = write_class_folders(tmp_path / "data", classes=2, per_class=4)
    reviewed = tmp_path / "reviewed.csv"
    reviewed.write_bytes("sha256,corrected_label\n".encode("utf-16"))
    args = ["data", "audit", str(data), "--output", str(tmp_path / "out"), "--fix", str(reviewed)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cnnserve: reviewed corrections {reviewed} are not UTF-8 text ("), err
    assert err.endswith("; save them as CSV (UTF-8)\n") and err.count("\n") == 1, err
