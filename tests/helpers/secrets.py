"""A Kubernetes secret as the kubelet mounts it, for tests of the files a server
follows (the API key file, the TLS certificate and key)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


class MountedSecret:
    """``folder/name`` -> ``..data/name`` for each of its files, ``..data`` -> a
    timestamped folder: a rotation writes a new folder and swaps ``..data`` in one
    rename, as the kubelet does (the files' own paths never change). Given text, the
    secret is one file, ``keys``."""

    def __init__(self, folder: Path, contents: str | Mapping[str, bytes]) -> None:
        self.folder = folder
        self._made = 0
        names = self.rotate(contents)
        for name in names:
            (folder / name).symlink_to(Path("..data") / name)
        self.path = folder / names[0]

    def rotate(self, contents: str | Mapping[str, bytes]) -> list[str]:
        """Swap in a new version of the files; their names."""
        files = {"keys": contents.encode()} if isinstance(contents, str) else contents
        self._made += 1
        target = self.folder / f"..2026_{self._made:02d}"
        target.mkdir()
        for name, data in files.items():
            (target / name).write_bytes(data)
        self._point_at(target.name)
        return list(files)

    def point_nowhere(self) -> None:
        """``..data`` names a folder that is gone: the files cannot be read."""
        self._point_at("..gone")

    def _point_at(self, name: str) -> None:
        link = self.folder / "..data_tmp"
        link.symlink_to(name)
        link.replace(self.folder / "..data")
