"""Multi-source datasets: class mapping, per-source counts, a global content-hash split,
label corrections keyed by image hash (service.training.sources)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from service.errors import DatasetError
from service.training.config import TrainConfig
from service.training.data import ImageSet, balanced_class_weight, load_image_folder
from service.training.sources import (
    RELABEL_FORMAT,
    Source,
    load_splits,
    merge,
    read_class_map,
    read_relabel,
)
from tests.helpers.images import renamed_class_folders, write_class_folders

SPLIT = {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 0}


@pytest.fixture
def two_sources(tmp_path: Path) -> tuple[Path, Path, Path]:
    a = write_class_folders(tmp_path / "a", classes=3, per_class=14)
    b = renamed_class_folders(tmp_path / "b", ["zero", "one", "two"], per_class=5)
    rules = tmp_path / "map.txt"
    rules.write_text("# source_class -> class\nzero -> class_0\none -> class_1\ntwo -> class_2\n")
    return a, b, rules


def test_merging_with_a_class_map_counts_each_source(
    two_sources: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    a, b, rules = two_sources
    with caplog.at_level("INFO"):
        splits = load_splits([str(a), str(b)], data_dir=Path("/x"), class_map=rules, **SPLIT)
    # Shown before training: one row per class, one column per source.
    table = caplog.text.split("dataset sources:\n", 1)[1].splitlines()
    assert table[2].split() == ["class_1", "14", "5"] and table[4].split() == ["total", "42", "15"]
    assert splits.train.class_names == ["class_0", "class_1", "class_2"]
    sources = splits.provenance["sources"]
    assert isinstance(sources, list)
    assert [s["images"] for s in sources] == [42, 15]
    assert sources[0]["per_class"] == {"class_0": 14, "class_1": 14, "class_2": 14}
    assert sources[1]["per_class"] == {"class_0": 5, "class_1": 5, "class_2": 5}
    assert sources[0]["content_sha256"] != sources[1]["content_sha256"]
    # b repeats some of a's pictures (the helper draws the same noise) under the same
    # class: one copy each is kept.
    kept = len(splits.train) + len(splits.validation) + len(splits.test)
    assert kept + splits.dropped_duplicates + splits.dropped_copies == 57
    assert splits.dropped_copies > 0 and splits.describe()["dropped_duplicate_copies"] > 0
    # b's "two" images are labelled class_2 in the merged set.
    b_two = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (b / "two").iterdir()}
    for split in (splits.train, splits.validation, splits.test):
        for h, label in zip(split.hashes(), split.labels.tolist(), strict=True):
            if h in b_two:
                assert split.class_names[label] == "class_2"
    card = splits.describe()
    assert card["class_map"]["rules"]["two"] == "class_2"  # type: ignore[index]


def test_an_unmapped_class_is_refused(two_sources: tuple[Path, Path, Path]) -> None:
    a, b, rules = two_sources
    rules.write_text("zero -> class_0\none -> class_1\n")
    with pytest.raises(DatasetError, match=r"'two' of source .* not mapped"):
        load_splits([str(a), str(b)], data_dir=Path("/x"), class_map=rules, **SPLIT)


def test_a_rule_for_no_class_is_named(
    two_sources: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    a, b, rules = two_sources
    rules.write_text(rules.read_text() + "tow -> class_2\n")  # a typo did nothing, unsaid
    with caplog.at_level("WARNING"):
        load_splits([str(a), str(b)], data_dir=Path("/x"), class_map=rules, **SPLIT)
    assert "class map rule(s) for 'tow' match no class of any source" in caplog.text


def test_sources_naming_different_classes_need_a_map(two_sources: tuple[Path, Path, Path]) -> None:
    a, b, _ = two_sources
    with pytest.raises(DatasetError, match="--class-map"):
        load_splits([str(a), str(b)], data_dir=Path("/x"), **SPLIT)


def test_a_malformed_class_map_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "map.txt"
    path.write_text("a -> b\nc => d\n")
    with pytest.raises(DatasetError, match=r"map.txt:2"):
        read_class_map(path)


def test_a_class_map_that_is_not_utf8_is_named_not_a_traceback(tmp_path: Path) -> None:
    # A UnicodeDecodeError traceback (saved in a legacy encoding, or a binary file).
    path = tmp_path / "map.txt"
    path.write_bytes("cat -> cat\nchat -> cat\n".encode("utf-16"))
    with pytest.raises(
        DatasetError,
        match=rf"class map {re.escape(str(path))} is not UTF-8 text .*save it as UTF-8",
    ):
        read_class_map(path)
    # A BOM an editor wrote is no part of the first class's name.
    path.write_bytes("cat -> kitten\n".encode("utf-8-sig"))
    assert read_class_map(path) == {"cat": "kitten"}


@pytest.mark.parametrize("corrections", [None, ["sha", "class_1"]])
def test_a_relabel_file_without_its_corrections_is_named(
    tmp_path: Path, corrections: object
) -> None:
    # A KeyError (or AttributeError) traceback.
    path = tmp_path / "relabel.json"
    data = {"format": RELABEL_FORMAT}
    path.write_text(
        json.dumps(data if corrections is None else {**data, "corrections": corrections})
    )
    with pytest.raises(DatasetError, match=re.escape(f'{path} has no "corrections" object')):
        read_relabel(path)


def _pixels(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8), dtype=np.uint8)


def test_an_image_in_two_sources_lands_in_one_split_only() -> None:
    """Source 1 has an official test set; source 2 holds a copy of one of its test images
    and shares ten pool images with source 1: every content is in exactly one split."""
    pool = _pixels(0, 60)
    test = _pixels(1, 10)
    one = Source(
        "one",
        "fashion_mnist",
        pool=ImageSet("one/train", ["x", "y"], np.arange(60) % 2, pixels=pool),
        test=ImageSet("one/test", ["x", "y"], np.arange(10) % 2, pixels=test),
    )
    shared = np.concatenate([test[:1], pool[:10], _pixels(2, 20)])
    two = Source(
        "two", "folder", pool=ImageSet("two", ["x", "y"], np.arange(31) % 2, pixels=shared)
    )
    merged = merge([one, two], class_map=None, corrections=None, **SPLIT)
    hashes = merged.images.hashes()
    by_content: dict[str, set[int]] = {}
    for h, s in zip(hashes, merged.split.tolist(), strict=True):
        if s >= 0:
            by_content.setdefault(h, set()).add(s)
    assert all(len(splits) == 1 for splits in by_content.values())
    # The copy of the official test image is kept only in test (source one's copy).
    assert by_content[hashes[70]] == {2} and merged.split[60] == 2
    # The ten shared pool images carry the other label in source two: no copy is kept.
    assert merged.conflicting >= 10 and merged.copies == 0
    assert merged.dropped + merged.conflicting == int((merged.split == -1).sum())
    assert merged.dropped >= 1


def test_label_corrections_follow_the_image_hash(tmp_path: Path) -> None:
    a = write_class_folders(tmp_path / "a", classes=3, per_class=14)
    target = sorted((a / "class_0").iterdir())[3]
    sha = hashlib.sha256(target.read_bytes()).hexdigest()
    relabel = tmp_path / "relabel.json"
    relabel.write_text(json.dumps({"format": RELABEL_FORMAT, "corrections": {sha: "class_2"}}))
    splits = load_splits([str(a)], data_dir=Path("/x"), relabel=relabel, **SPLIT)
    found = [
        split.class_names[label]
        for split in (splits.train, splits.validation, splits.test)
        for h, label in zip(split.hashes(), split.labels.tolist(), strict=True)
        if h == sha
    ]
    assert found == ["class_2"]
    corrections = splits.describe()["label_corrections"]
    assert corrections["images_relabelled"] == 1  # type: ignore[index]
    assert (target.parent / target.name).read_bytes() == target.read_bytes()  # file untouched

    relabel.write_text(json.dumps({"format": RELABEL_FORMAT, "corrections": {sha: "class_9"}}))
    with pytest.raises(DatasetError, match="class_9"):
        load_splits([str(a)], data_dir=Path("/x"), relabel=relabel, **SPLIT)


def test_one_source_without_map_splits_as_before(tmp_path: Path) -> None:
    from service.training.data import make_splits

    a = write_class_folders(tmp_path / "a", classes=3, per_class=14)
    old = make_splits(a, data_dir=Path("/x"), **SPLIT)
    new = load_splits([str(a)], data_dir=Path("/x"), **SPLIT)
    assert old.describe() == new.describe()


def test_balanced_class_weights_equalise_each_class_total() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    weights = balanced_class_weight(labels)
    assert weights[0] * 90 == pytest.approx(weights[1] * 10) == pytest.approx(50)


def test_new_config_fields_keep_old_fingerprints() -> None:
    """Runs started before these fields existed still resume from their work folder."""
    cfg = TrainConfig()
    card = cfg.to_card()
    assert card["extra_datasets"] == [] and card["class_map"] is None
    assert TrainConfig(class_weight="balanced").fingerprint() != cfg.fingerprint()


def test_pixel_and_file_sources_merge_into_one_set(tmp_path: Path) -> None:
    """Fashion-MNIST-like arrays beside a folder of files: each image still reads, hashes
    and preprocesses through its own source."""
    from service.preprocessing import PreprocessSpec

    folder = write_class_folders(tmp_path / "files", classes=3, per_class=4)
    arrays = Source(
        "arrays",
        "fashion_mnist",
        pool=ImageSet("arrays", ["class_0", "class_1", "class_2"], np.arange(9) % 3, _pixels(3, 9)),
    )
    files = Source("files", "folder", pool=load_image_folder(folder))
    merged = merge([arrays, files], class_map=None, corrections=None, **SPLIT)
    images = merged.images
    assert images.parts is not None and len(images) == 21
    spec = PreprocessSpec(height=16, width=16)
    assert images.model_input(0, spec).shape == images.model_input(20, spec).shape == (16, 16, 3)
    assert images.raw(20) == files.pool.raw(11) and images.raw(2) == arrays.pool.raw(2)
    tail = images.subset(np.array([20, 0]), "tail")
    assert tail.raw(0) == files.pool.raw(11) and tail.labels.tolist() == [2, 0]
