"""The browser the e2e tests drive: Debian's chromium (playwright's own download is not
reachable from our machines, and never needed)."""

from __future__ import annotations

import shutil


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found is not None:
            return found
    raise RuntimeError("chromium not found: install the Debian package (make test does)")
