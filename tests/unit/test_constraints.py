"""constraints.txt: the exact versions `make install` and the image install. Each of
pyproject.toml's requirements is pinned within its range, and so is every package they
bring in: an added dependency without `make lock` would install unpinned."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from tests.helpers.deployment import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = ("dev", "loadtest")  # what `make install` installs (test_deployment_image)
_PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s;#]*)")


def pins() -> dict[NormalizedName, Version]:
    pinned: dict[NormalizedName, Version] = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        found = _PIN.fullmatch(line.strip())
        assert found, f"constraints.txt:{number} is not name==version: {line!r}"
        name = canonicalize_name(found.group(1))
        assert name not in pinned, f"constraints.txt:{number} pins {name} twice"
        pinned[name] = Version(found.group(2))
    return pinned


def applies(requirement: Requirement, extras: set[str]) -> bool:
    """Whether ``requirement`` is installed here, for a package installed with
    ``extras``."""
    marker = requirement.marker
    return marker is None or any(marker.evaluate({"extra": e}) for e in extras | {""})


def direct_requirements() -> list[Requirement]:
    listed = PROJECT["dependencies"] + [
        r for extra in EXTRAS for r in PROJECT["optional-dependencies"][extra]
    ]
    return [r for r in map(Requirement, listed) if applies(r, set())]


def test_each_line_pins_one_package_once() -> None:
    assert len(pins()) > 50


@pytest.mark.parametrize("requirement", direct_requirements(), ids=str)
def test_pyproject_requirements_are_pinned_within_their_range(requirement: Requirement) -> None:
    pinned = pins().get(canonicalize_name(requirement.name))
    assert pinned is not None, f"{requirement.name} is not in constraints.txt: run `make lock`"
    assert requirement.specifier.contains(pinned, prereleases=True), (
        f"constraints.txt pins {requirement.name}=={pinned}, outside pyproject.toml's "
        f"{requirement}: run `make lock`"
    )


def test_every_installed_dependency_is_pinned() -> None:
    """The closure of the project's requirements, read from what is installed here (the
    metadata pip installed from): each package in it is pinned, at the version installed
    (`make install` applied the constraints)."""
    pinned = pins()
    seen: dict[NormalizedName, set[str]] = {}
    queue: list[tuple[str, set[str]]] = [(r.name, set(r.extras)) for r in direct_requirements()]
    while queue:
        name, extras = queue.pop()
        key = canonicalize_name(name)
        if key in seen and extras <= seen[key]:
            continue
        seen.setdefault(key, set()).update(extras)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} is required but not installed: run `make install`")
        queue += [(r.name, set(r.extras)) for r in map(Requirement, requires) if applies(r, extras)]
    unpinned = sorted(set(seen) - set(pinned))
    assert not unpinned, f"installed but not in constraints.txt: {unpinned}; run `make lock`"
    drifted = {
        name: (importlib.metadata.version(name), str(pinned[name]))
        for name in seen
        if Version(importlib.metadata.version(name)) != pinned[name]
    }
    assert not drifted, f"installed, pinned: {drifted}; rm .venv/.installed and `make install`"
