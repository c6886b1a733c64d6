"""The error table in docs/serving.md is the one in service/errors.py."""

from __future__ import annotations

import re
from pathlib import Path

from service import errors

DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
# Raised by `cnnserve train`/`evaluate`/`promote` only; never an HTTP or gRPC answer.
OFFLINE = {errors.DatasetError, errors.ExportError, errors.PromotionError, errors.NoServer}


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def test_every_served_error_is_documented_with_its_statuses() -> None:
    rows = {
        m["code"]: (int(m["http"]), m["grpc"])
        for m in re.finditer(
            r"^\| `(?P<code>[a-z_]+)` \| (?P<http>\d{3})[^|]* \| (?P<grpc>[A-Z_]+) \|",
            DOC.read_text(),
            re.MULTILINE,
        )
    }
    # Only the table's own classes: tests may subclass errors for their own use.
    served = [
        c
        for c in _subclasses(errors.CnnserveError)
        if c.__module__ == errors.__name__ and not issubclass(c, tuple(OFFLINE))
    ]
    assert len(served) > 10
    for cls in served:
        assert cls.code in rows, f"{cls.__name__} ({cls.code}) is missing from {DOC.name}"
        assert rows[cls.code] == (cls.http_status, cls.grpc_code.name), cls.code
    assert set(rows) == {c.code for c in served}


def test_every_setting_is_named_in_the_docs() -> None:
    """Each Settings field is an environment variable a person can only use if the
    docs name it (four were not)."""
    from service.config import Settings

    root = DOC.parents[1]
    text = (root / "README.md").read_text() + "".join(
        page.read_text() for page in (root / "docs").glob("*.md")
    )
    missing = [
        f"CNNSERVE_{name.upper()}" for name in Settings.model_fields
        if f"CNNSERVE_{name.upper()}" not in text
    ]  # fmt: skip
    assert missing == []
