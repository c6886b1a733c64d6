from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from service.errors import DatasetError
from service.training.data import (
    FASHION_MNIST_CLASSES,
    ImageSet,
    Splits,
    check_disjoint,
    load_fashion_mnist,
    load_image_folder,
    make_splits,
    oversample,
    split_by_hash,
)
from tests.helpers.images import write_class_folders

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def test_fashion_mnist_from_the_debian_package() -> None:
    train, test = load_fashion_mnist(FASHION_MNIST)
    assert train.pixels is not None and test.pixels is not None
    assert train.pixels.shape == (60_000, 28, 28) and test.pixels.shape == (10_000, 28, 28)
    assert train.pixels.dtype == np.uint8
    for split in (train, test):
        assert split.labels.min() == 0 and split.labels.max() == 9
        assert np.bincount(split.labels).tolist() == [len(split) // 10] * 10
    assert train.class_names == list(FASHION_MNIST_CLASSES)


def test_missing_fashion_mnist_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_not_an_idx_file(tmp_path: Path) -> None:
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(b"\x00\x00\x08\x01garbage")
    with pytest.raises(DatasetError, match="not an IDX file"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_splits_are_deterministic_and_disjoint() -> None:
    a = make_splits(
        "fashion_mnist", data_dir=FASHION_MNIST, val_fraction=0.1, test_fraction=0, seed=0
    )
    b = make_splits(
        "fashion_mnist", data_dir=FASHION_MNIST, val_fraction=0.1, test_fraction=0, seed=0
    )
    assert a.describe() == b.describe()
    assert len(a.test) == 10_000
    assert len(a.train) + len(a.validation) + a.dropped_duplicates == 60_000
    assert 0.08 < len(a.validation) / 60_000 < 0.12


def test_folder_dataset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_class_folders(tmp_path / "data", classes=3, per_class=6)
    (root / "class_0" / "notes.txt").write_text("not an image")
    # Hidden names at any depth are no images of the class (they crashed training).
    (root / "class_0" / "._0.jpg").write_bytes(b"Mac OS X AppleDouble")
    (root / "class_1" / ".ipynb_checkpoints").mkdir()
    (root / "class_1" / ".ipynb_checkpoints" / "1.png").write_bytes(
        (root / "class_1" / "1.png").read_bytes()
    )
    with caplog.at_level("WARNING"):
        images = load_image_folder(root)
    assert images.class_names == ["class_0", "class_1", "class_2"]
    assert len(images) == 18 and np.bincount(images.labels).tolist() == [6, 6, 6]
    assert "skipped 1 file(s) without an image extension" in caplog.text  # notes.txt, said
    assert "class_0/notes.txt" in caplog.text
    x = images.model_input(0, __import__("service.preprocessing").preprocessing.PreprocessSpec())
    assert x.shape == (224, 224, 3)


def test_undecodable_files_are_all_named_before_any_work(tmp_path: Path) -> None:
    # A bad file used to stop the fit mid-epoch in tf.data, naming only the first one.
    root = write_class_folders(tmp_path / "data", classes=2, per_class=4)
    good = (root / "class_0" / "1.png").read_bytes()
    (root / "class_0" / "random.jpg").write_bytes(bytes(range(256)) * 4)
    (root / "class_1" / "cut.png").write_bytes(good[: len(good) // 2])
    (root / "class_1" / "empty.webp").write_bytes(b"")
    with pytest.raises(DatasetError) as caught:
        load_image_folder(root)
    message = caught.value.message
    assert message.startswith(f"3 of the 11 files in {root} are not images")
    for name in ("class_0/random.jpg", "class_1/cut.png", "class_1/empty.webp"):
        assert str(root / name) in message
    assert "1.png:" not in message


def test_a_long_list_of_bad_files_is_cut(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "data", classes=2, per_class=1)
    for i in range(25):
        (root / "class_1" / f"bad{i:02d}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError) as caught:
        load_image_folder(root)
    lines = caught.value.message.splitlines()
    assert len(lines) == 1 + 20 + 1 and lines[-1] == "  … and 5 more"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("do\ng", "holds a line break"),
        ("a\u2028b", "holds a line break"),  # str.splitlines splits there too
        ("cat ", "begins or ends with spaces"),
        ("   ", "empty or only spaces"),
        ("ca\udcfft", "not valid UTF-8"),  # os.fsdecode of the byte 0xff
    ],
)
def test_class_names_labels_txt_cannot_keep_are_refused(
    tmp_path: Path, name: str, problem: str
) -> None:
    """labels.txt keeps one name a line, read back with splitlines and stripped: a
    folder named "do\ng" published a version the gateway could not load."""
    root = write_class_folders(tmp_path / "data", classes=2, per_class=2)
    (root / "class_1").rename(root / name)
    with pytest.raises(DatasetError, match=problem) as caught:
        load_image_folder(root)
    assert "rename" in caught.value.message


def test_entries_that_are_no_files_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_class_folders(tmp_path / "data", classes=2, per_class=3)
    (root / "class_0" / "dangling.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(root / "class_1" / "pipe.png")
    with caplog.at_level("WARNING"):
        images = load_image_folder(root)
    assert len(images) == 6
    assert "skipped 2 entr(ies) that are no readable files" in caplog.text
    assert "class_0/dangling.png" in caplog.text and "class_1/pipe.png" in caplog.text


def test_linked_subfolders_are_followed_and_a_link_loop_ends(tmp_path: Path) -> None:
    """A class folder made of links to where the images live (rglob passed over linked
    subfolders unsaid); a link back up to the class folder is read once, not forever."""
    elsewhere = write_class_folders(tmp_path / "elsewhere", classes=2, per_class=4)
    root = write_class_folders(tmp_path / "data", classes=2, per_class=2)
    (root / "class_0" / "more").symlink_to(elsewhere / "class_0", target_is_directory=True)
    (root / "class_1" / "loop").symlink_to(root / "class_1", target_is_directory=True)
    images = load_image_folder(root)
    assert np.bincount(images.labels).tolist() == [6, 2]
    assert any("more" in p.parts for p in images.paths)


def test_links_out_of_a_class_and_images_outside_classes_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`cat/all -> ..` put every image of every class under "cat" (only a count of
    conflicting copies said anything); images beside the class folders vanished unsaid."""
    root = write_class_folders(tmp_path / "data", classes=3, per_class=2)
    (root / "class_0" / "all").symlink_to(root, target_is_directory=True)
    (root / "class_0" / "up").symlink_to(tmp_path, target_is_directory=True)
    (root / "class_1" / "other").symlink_to(root / "class_2", target_is_directory=True)
    (root / "stray.png").write_bytes(next((root / "class_2").iterdir()).read_bytes())
    with caplog.at_level("WARNING"):
        images = load_image_folder(root)
    assert np.bincount(images.labels).tolist() == [2, 2, 2]
    assert (
        "skipped 3 linked folder(s) that lead out of their class folder (to the dataset, "
        "above it, or into another class): class_0/all, class_0/up, class_1/other"
    ) in caplog.text
    assert "skipped 1 image(s) outside any class folder: stray.png" in caplog.text


def test_folder_dataset_needs_two_classes(tmp_path: Path) -> None:
    (tmp_path / "only").mkdir()
    with pytest.raises(DatasetError, match="two class subfolders"):
        load_image_folder(tmp_path)


def _pixels(n: int) -> ImageSet:
    rng = np.random.default_rng(0)
    return ImageSet(
        name="all",
        class_names=["a", "b"],
        labels=rng.integers(0, 2, n).astype(np.int64),
        pixels=rng.integers(0, 256, (n, 4, 4), dtype=np.uint8),
    )


def test_split_keeps_duplicates_together() -> None:
    images = _pixels(400)
    assert images.pixels is not None
    images.pixels[1::2] = images.pixels[0::2]  # every image has a twin
    train, val = split_by_hash(images, (0.7, 0.3), ("train", "validation"), seed=3)
    check_disjoint(train, val)
    assert len(train) + len(val) == 400 and len(val) > 60


def test_planted_duplicate_is_caught() -> None:
    images = _pixels(200)
    train, val = split_by_hash(images, (0.8, 0.2), ("train", "validation"), seed=0)
    assert train.pixels is not None and val.pixels is not None
    planted = ImageSet(
        name="validation",
        class_names=val.class_names,
        labels=np.append(val.labels, train.labels[5]),
        pixels=np.concatenate([val.pixels, train.pixels[5:6]]),
    )
    with pytest.raises(DatasetError, match="data leakage"):
        check_disjoint(train, planted)


def test_oversample_balances_classes() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1, dtype=np.int64)
    picked = oversample(labels, seed=0)
    assert np.bincount(labels[picked]).tolist() == [10, 10, 10]
    assert set(range(14)) <= set(picked.tolist())


def test_fingerprint_changes_with_labels() -> None:
    images = _pixels(10)
    other = ImageSet(
        name="x", class_names=images.class_names, labels=1 - images.labels, pixels=images.pixels
    )
    assert images.fingerprint() != other.fingerprint()


def test_a_file_given_as_dataset_folder_is_named_as_such(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        load_image_folder(afile)


def test_classes_too_thin_to_learn_or_measure_are_warned_about() -> None:
    def part(name: str, labels: list[int]) -> ImageSet:
        pixels = np.zeros((len(labels), 4, 4), np.uint8)
        return ImageSet(name, ["a", "b", "rare"], np.array(labels, np.int64), pixels=pixels)

    splits = Splits(
        train=part("train", [0, 1] * 20),
        validation=part("validation", [0] * 5 + [1] * 5 + [2]),
        test=part("test", [0] * 6 + [1] * 4),
    )
    warnings = splits.thin_classes()
    assert warnings == [
        "class 'rare' has 0 images in the train split (it cannot be learnt); add images of it",
        "class 'rare' has 1 image in the validation split (its scores are noise); add images of it",
        "class 'b' has 4 images in the test split (its scores are noise); add images of it",
        "class 'rare' has 0 images in the test split (its scores are noise); add images of it",
    ]
    assert splits.describe()["warnings"] == warnings
    assert splits.describe()["per_class"]["validation"] == {"a": 5, "b": 5, "rare": 1}


def test_identical_images_are_kept_once_and_never_under_two_labels(tmp_path: Path) -> None:
    """Copies land in one split (the hash decides), so they were all kept: one test
    image scored twice, once wrong whatever the model says."""
    root = write_class_folders(tmp_path / "data", classes=2, per_class=10)
    picture = (root / "class_0" / "1.png").read_bytes()
    (root / "class_0" / "again.png").write_bytes(picture)  # same label: one copy kept
    (root / "class_1" / "also.png").write_bytes((root / "class_0" / "3.png").read_bytes())
    splits = make_splits(root, data_dir=tmp_path, val_fraction=0.2, test_fraction=0.2, seed=0)
    every = [h for s in (splits.train, splits.validation, splits.test) for h in s.hashes()]
    assert len(every) == len(set(every)) == 22 - 1 - 2
    assert (splits.dropped_copies, splits.dropped_conflicting_labels) == (1, 2)
    conflicting = hashlib.sha256((root / "class_1" / "also.png").read_bytes()).hexdigest()
    assert conflicting not in every


def test_a_sample_is_drawn_from_every_class_not_the_first() -> None:
    """--limit and --test-limit: a folder dataset is read class by class, and its first
    N images were its first classes only."""
    labels = np.repeat(np.arange(3), 60).astype(np.int64)  # class order, as folders
    images = ImageSet(
        name="test",
        class_names=["a", "b", "c"],
        labels=labels,
        pixels=np.arange(180 * 4, dtype=np.uint8).reshape(180, 2, 2) % 251,
    )
    drawn = images.sample(30, seed=0)
    assert len(drawn) == 30 and drawn.name == "test"
    counts = np.bincount(drawn.labels, minlength=3)
    assert counts.min() >= 9 and counts.max() <= 11, counts  # each class in proportion
    again = images.sample(30, seed=0)
    assert drawn.hashes() == again.hashes()  # the same images each run
    assert images.sample(0, seed=0) is images and images.sample(500, seed=0) is images


def test_verify_draws_a_folders_images_from_every_class(tmp_path: Path) -> None:
    from service.verify import load_images

    folder = write_class_folders(tmp_path / "data", classes=3, per_class=12)
    images = load_images(folder, tmp_path, limit=9)
    assert len(images.pixels) == 9 and len(set(images.classes)) == 3
