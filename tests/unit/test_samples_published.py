"""The demo samples a version carries (assets.extra/demo_samples): read back as
written, and a folder someone edited into nonsense is no samples, not an error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.samples import SAMPLES_FOLDER, SAMPLES_INDEX, published_samples, write_samples


def version_with_samples(tmp_path: Path) -> Path:
    version = tmp_path / "m" / "1"
    (version / "assets.extra").mkdir(parents=True)
    pixels = np.zeros((8, 8, 3), np.uint8)
    write_samples(
        version / "assets.extra" / SAMPLES_FOLDER,
        [(pixels, "cat", "test split image 0"), (pixels + 200, "dog", "test split image 3")],
    )
    return version


def test_written_samples_read_back(tmp_path: Path) -> None:
    found = published_samples(version_with_samples(tmp_path))
    assert [(s.label, s.source) for s in found] == [
        ("cat", "test split image 0"),
        ("dog", "test split image 3"),
    ]
    assert all(s.png.startswith(b"\x89PNG") for s in found)
    assert published_samples(tmp_path / "none") == ()


@pytest.mark.parametrize(
    "index",
    [
        "not json",
        json.dumps([{"file": "0.png"}]),  # no label
        json.dumps([{"file": "../../../etc/passwd", "label": "x", "source": "y"}]),
        json.dumps([{"file": SAMPLES_INDEX, "label": "x", "source": "y"}]),  # not a PNG
        json.dumps({"file": "0.png"}),
    ],
)
def test_an_edited_index_is_no_samples(
    tmp_path: Path, index: str, caplog: pytest.LogCaptureFixture
) -> None:
    version = version_with_samples(tmp_path)
    (version / "assets.extra" / SAMPLES_FOLDER / SAMPLES_INDEX).write_text(index)
    assert published_samples(version) == ()
    assert "no published samples for the demo page" in caplog.text
