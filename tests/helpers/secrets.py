"""A Kubernetes secret as the kubelet mounts it, for tests of the API key file."""

from __future__ import annotations

from pathlib import Path


class MountedSecret:
    """``folder/keys`` -> ``..data/keys``, ``..data`` -> a timestamped folder: a
    rotation writes a new folder and swaps ``..data`` in one rename, as the kubelet
    does (the file's own path never changes)."""

    def __init__(self, folder: Path, text: str) -> None:
        self.folder = folder
        self.path = folder / "keys"
        self._made = 0
        self.rotate(text)
        self.path.symlink_to(Path("..data") / "keys")

    def rotate(self, text: str) -> None:
        self._made += 1
        target = self.folder / f"..2026_{self._made:02d}"
        target.mkdir()
        (target / "keys").write_text(text)
        self._point_at(target.name)

    def point_nowhere(self) -> None:
        """``..data`` names a folder that is gone: the key file cannot be read."""
        self._point_at("..gone")

    def _point_at(self, name: str) -> None:
        link = self.folder / "..data_tmp"
        link.symlink_to(name)
        link.replace(self.folder / "..data")
