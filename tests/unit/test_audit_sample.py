"""What `cnnserve data audit` looks at: a --limit sample drawn from every source and
split, and a copy that training dropped counted as no leak."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from service.training.audit import AuditConfig, Dataset, _pair, load
from tests.helpers.images import write_class_folders


def test_a_limit_samples_every_source_and_split(tmp_path: Path) -> None:
    """The first N were all the first source's (and with Fashion-MNIST all training
    images): a leak into the test split or from another source could not show."""
    first = write_class_folders(tmp_path / "first", classes=2, per_class=30)
    second = write_class_folders(tmp_path / "second", classes=2, per_class=30, size=40)
    cfg = AuditConfig(limit=40)
    data = load([str(first), str(second)], data_dir=tmp_path, class_map=None, cfg=cfg)
    assert len(data.ids) == len(data.labels) == len(data.hashes) == len(data.pixels) == 40
    assert {Path(i).parts[-3] for i in data.ids} == {"first", "second"}
    assert {"train", "test"} <= set(data.split)
    again = load([str(first), str(second)], data_dir=tmp_path, class_map=None, cfg=cfg)
    assert again.ids == data.ids  # the same sample each time (the audit's seed)
    # Each image keeps its own label and hash, wherever the sample took it from.
    whole = load([str(first), str(second)], data_dir=tmp_path, class_map=None, cfg=AuditConfig())
    index = {image: k for k, image in enumerate(whole.ids)}
    for k, image in enumerate(data.ids):
        assert data.hashes[k] == whole.hashes[index[image]]
        assert data.labels[k] == whole.labels[index[image]]


def test_a_copy_training_dropped_is_no_cross_split_pair(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "data", classes=2, per_class=4)
    shutil.copyfile(root / "class_0" / "1.png", root / "class_0" / "1copy.png")
    data = load([str(root)], data_dir=tmp_path, class_map=None, cfg=AuditConfig())
    assert data.split.count("dropped") == 1
    kept, dropped = (data.ids.index(str(root / "class_0" / n)) for n in ("1.png", "1copy.png"))
    if data.split[kept] == "dropped":
        kept, dropped = dropped, kept
    pair = _pair(data, kept, dropped, "exact", 0, 0.0)
    assert pair["cross_split"] is False
    other = Dataset(
        pixels=np.zeros((2, 8, 8), np.uint8),
        labels=np.zeros(2, np.int64),
        classes=["a", "b"],
        ids=["x", "y"],
        hashes=["h1", "h2"],
        split=["train", "test"],
    )
    assert _pair(other, 0, 1, "near", 1, 0.5)["cross_split"] is True
