"""Datasets for training: Fashion-MNIST from its IDX files, or a folder of class folders.

Images stay at their source size in memory (or on disk) and become model input through
:mod:`service.preprocessing` one batch at a time, so a 224×224 copy of a whole dataset
never exists. Splits are decided by content hash: identical images always land in the
same split, and :func:`check_disjoint` proves no image crosses splits.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.errors import DatasetError, InvalidImage, InvalidRequest
from service.preprocessing import PreprocessSpec, UInt8Image, preprocess_array, preprocess_bytes

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Folder datasets may hold photos far above 224×224; refuse only absurd ones.
_FOLDER_MAX_PIXELS = 100_000_000

Labels = npt.NDArray[np.int64]
# Fewer validation or test images of a class than this is warned about.
MIN_HELD_OUT = 5


@dataclass
class ImageSet:
    """Labelled images, in memory (``pixels``), as files (``paths``), or drawn from other
    sets (``parts`` and ``part_index`` rows of (part, index): a merge of mixed sources)."""

    name: str
    class_names: list[str]
    labels: Labels
    pixels: npt.NDArray[np.uint8] | None = None
    paths: list[Path] | None = None
    _hashes: list[str] | None = field(default=None, repr=False)
    parts: list[ImageSet] | None = None
    part_index: npt.NDArray[np.int64] | None = None

    def __post_init__(self) -> None:
        if self.pixels is not None:
            count = len(self.pixels)
        elif self.part_index is not None:
            count = len(self.part_index)
        else:
            count = len(self.paths or [])
        if count != len(self.labels):
            raise DatasetError(f"{self.name}: {count} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def raw(self, index: int) -> bytes:
        """The bytes that identify an image: its pixels, or its encoded file."""
        if self.pixels is not None:
            return bytes(self.pixels[index].tobytes())
        if self.parts is not None and self.part_index is not None:
            part, inner = self.part_index[index]
            return self.parts[int(part)].raw(int(inner))
        assert self.paths is not None
        return self.paths[index].read_bytes()

    def hashes(self) -> list[str]:
        if self._hashes is None:
            self._hashes = [hashlib.sha256(self.raw(i)).hexdigest() for i in range(len(self))]
        return self._hashes

    def model_input(self, index: int, spec: PreprocessSpec) -> UInt8Image:
        """The exact uint8 [H,W,3] the served model would get for this image."""
        if self.pixels is not None:
            return preprocess_array(self.pixels[index], spec)
        if self.parts is not None and self.part_index is not None:
            part, inner = self.part_index[index]
            return self.parts[int(part)].model_input(int(inner), spec)
        assert self.paths is not None
        try:
            return preprocess_bytes(self.raw(index), spec, max_pixels=_FOLDER_MAX_PIXELS)
        except InvalidImage as exc:
            raise DatasetError(f"{self.paths[index]}: {exc.message}") from None

    def subset(self, indices: npt.NDArray[np.int64], name: str) -> ImageSet:
        hashes = self.hashes()
        return ImageSet(
            name=name,
            class_names=self.class_names,
            labels=self.labels[indices],
            pixels=self.pixels[indices] if self.pixels is not None else None,
            paths=[self.paths[i] for i in indices] if self.paths is not None else None,
            _hashes=[hashes[i] for i in indices],
            parts=self.parts,
            part_index=self.part_index[indices] if self.part_index is not None else None,
        )

    def sample(self, limit: int, seed: int) -> ImageSet:
        """``limit`` images drawn at random, each class in proportion
        (:func:`stratified`), or all of them: the first N of a folder dataset, read class
        by class, were one or two classes."""
        if not limit or limit >= len(self):
            return self
        return self.subset(stratified(self.labels, limit, seed), self.name)

    def fingerprint(self) -> str:
        """One hash for the whole set (images, labels and class names, in order)."""
        digest = hashlib.sha256("\n".join(self.class_names).encode())
        for h, label in zip(self.hashes(), self.labels.tolist(), strict=True):
            digest.update(f"{h}:{label}\n".encode())
        return digest.hexdigest()


@dataclass
class Splits:
    train: ImageSet
    validation: ImageSet
    test: ImageSet
    dropped_duplicates: int = 0
    # Multi-source runs: what each source brought and how labels were changed
    # (service.training.sources); recorded in the model card's "dataset".
    provenance: dict[str, object] = field(default_factory=dict)
    dropped_copies: int = 0  # identical images under one label beyond the first
    dropped_conflicting_labels: int = 0  # identical images under different labels

    def per_class(self) -> dict[str, dict[str, int]]:
        """Images per class, per split (split name → class → count)."""
        return {
            split.name: dict(
                zip(
                    split.class_names,
                    np.bincount(split.labels, minlength=len(split.class_names)).tolist(),
                    strict=True,
                )
            )
            for split in (self.train, self.validation, self.test)
        }

    def thin_classes(self) -> list[str]:
        """Warnings for classes too small in a split to learn or to measure: none to
        train on, or under MIN_HELD_OUT images to validate or test on (one image makes a
        class's recall 0 or 100%)."""
        found = []
        for split_name, counts in self.per_class().items():
            learnt = split_name == self.train.name
            least, why = (
                (1, "it cannot be learnt") if learnt else (MIN_HELD_OUT, "its scores are noise")
            )
            for name, count in counts.items():
                if count < least:
                    found.append(
                        f"class {name!r} has {count} image{'' if count == 1 else 's'} in the "
                        f"{split_name} split ({why}); add images of it"
                    )
        return found

    def describe(self) -> dict[str, object]:
        thin = self.thin_classes()
        return {
            **self.provenance,
            **({"warnings": thin} if thin else {}),
            "per_class": self.per_class(),
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
            "dropped_cross_split_duplicates": self.dropped_duplicates,
            "dropped_duplicate_copies": self.dropped_copies,
            "dropped_conflicting_labels": self.dropped_conflicting_labels,
            "train_sha256": self.train.fingerprint(),
            "validation_sha256": self.validation.fingerprint(),
            "test_sha256": self.test.fingerprint(),
        }


# --- readers ---------------------------------------------------------------------------


def _read_idx(path: Path, magic: int) -> npt.NDArray[np.uint8]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 8 or int.from_bytes(data[:4], "big") != magic:
        raise DatasetError(f"{path} is not an IDX file (magic number {magic:#x} expected)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DatasetError(
            f"{path}: header says {expected} bytes of data, file has {len(data) - offset}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.exists():
            return candidate
    raise DatasetError(
        f"Fashion-MNIST file {stem}(.gz) not found in {directory}; install the Debian package "
        "'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist) or set "
        "CNNSERVE_FASHION_MNIST_DIR / --data-dir to the folder holding the IDX files"
    )


def load_fashion_mnist(directory: Path) -> tuple[ImageSet, ImageSet]:
    """The official 60,000-image train and 10,000-image test sets, 28×28 greyscale."""
    parts = []
    for prefix in ("train", "t10k"):
        images = _read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"), 0x0803)
        labels = _read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"), 0x0801)
        parts.append(
            ImageSet(
                name=f"fashion_mnist/{prefix}",
                class_names=list(FASHION_MNIST_CLASSES),
                labels=labels.astype(np.int64),
                pixels=images,
            )
        )
    return parts[0], parts[1]


def load_image_folder(root: Path) -> ImageSet:
    """``root/<class name>/<image>``: class names sorted, one label per subfolder."""
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"dataset folder {root} {what}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DatasetError(f"{root} needs at least two class subfolders, found {len(class_dirs)}")
    for class_dir in class_dirs:
        check_class_name(class_dir.name, f"class folder {class_dir}")
    paths: list[Path] = []
    labels: list[int] = []
    skipped: list[Path] = []
    no_files: list[Path] = []
    not_read: dict[Path, str] = {}
    crossing: list[Path] = []
    for label, class_dir in enumerate(class_dirs):
        entries, unreadable, leading_out = _class_entries(class_dir)
        crossing += leading_out
        if class_dir in unreadable:
            raise DatasetError(f"class folder {class_dir} cannot be read: {unreadable[class_dir]}")
        not_read.update(unreadable)
        visible = [p for p in entries if p.is_file()]
        # A broken link, a pipe, a link loop: no image to read, and they vanished unsaid.
        no_files += [p for p in entries if not p.is_file() and not p.is_dir()]
        files = sorted(p for p in visible if p.suffix.lower() in IMAGE_SUFFIXES)
        skipped += [p for p in visible if p.suffix.lower() not in IMAGE_SUFFIXES]
        if not files:
            raise DatasetError(
                f"class folder {class_dir} holds no images ({sorted(IMAGE_SUFFIXES)})"
            )
        paths.extend(files)
        labels.extend([label] * len(files))
    if skipped:  # a .jfif or .heic would vanish from the data unsaid
        log.warning(
            "%s: skipped %d file(s) without an image extension (%s): %s",
            root,
            len(skipped),
            " ".join(sorted(IMAGE_SUFFIXES)),
            _shown(root, skipped),
        )
    if no_files:
        log.warning(
            "%s: skipped %d entr(ies) that are no readable files (broken links, pipes, "
            "link loops): %s",
            root,
            len(no_files),
            _shown(root, no_files),
        )
    if crossing:
        log.warning(
            "%s: skipped %d linked folder(s) that lead out of their class folder (to the "
            "dataset, above it, or into another class): %s",
            root,
            len(crossing),
            _shown(root, crossing),
        )
    loose = sorted(
        p
        for p in root.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if loose:  # an image beside the class folders has no class: it vanished unsaid
        log.warning(
            "%s: skipped %d image(s) outside any class folder: %s",
            root,
            len(loose),
            _shown(root, loose),
        )
    if not_read:  # rglob passed over them in silence, and their images with them
        log.warning(
            "%s: skipped %d subfolder(s) that cannot be read (%s): %s",
            root,
            len(not_read),
            "; ".join(sorted(set(not_read.values()))),
            _shown(root, list(not_read)),
        )
    return ImageSet(
        name=root.name,
        class_names=[p.name for p in class_dirs],
        labels=np.asarray(labels, dtype=np.int64),
        paths=paths,
        _hashes=_checked_hashes(root, paths),
    )


def _class_entries(class_dir: Path) -> tuple[list[Path], dict[Path, str], list[Path]]:
    """What a class folder holds at any depth, the folders that could not be read (with
    why), and the linked folders not followed because they lead out of the class: to the
    dataset folder, above it, or into another class's folder (`cat/all -> ..` labelled
    every image "cat", and only a count of conflicting copies said anything). Hidden
    names are not images of the class: macOS's "._x.jpg" AppleDouble files,
    .ipynb_checkpoints copies (a duplicate of every image). Other linked subfolders are
    followed (rglob passed over them unsaid), each real folder once: a link loop ends."""
    entries: list[Path] = []
    unreadable: dict[Path, str] = {}
    crossing: list[Path] = []
    seen: set[str] = set()
    own = os.path.realpath(class_dir)
    dataset = os.path.dirname(own)

    def failed(exc: OSError) -> None:
        unreadable[Path(exc.filename)] = exc.strerror or str(exc)

    def outside(real: str) -> bool:
        mine = real == own or real.startswith(own + os.sep)
        return not mine and (
            real == dataset
            or real.startswith(dataset + os.sep)
            or dataset.startswith(real + os.sep)
        )

    for folder, dirs, files in os.walk(class_dir, onerror=failed, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # reached again through a link: a loop, or a second way in
            dirs.clear()
            continue
        if outside(real):
            crossing.append(Path(folder))
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        entries += [Path(folder, name) for name in files if not name.startswith(".")]
    return entries, unreadable, crossing


def _shown(root: Path, paths: Sequence[Path], count: int = 5) -> str:
    shown = ", ".join(str(p.relative_to(root)) for p in sorted(paths)[:count])
    return shown + (f" and {len(paths) - count} more" if len(paths) > count else "")


def check_class_name(name: str, where: str) -> None:
    """A class name must come back whole from labels.txt (one name a line, read with
    splitlines and stripped: a folder named "do\ng" published a version the gateway
    could not load) and be UTF-8 (a folder name that is not was a traceback)."""
    if not name.strip():
        problem = "is empty or only spaces"
    elif name != name.strip():
        problem = "begins or ends with spaces"
    elif len(name.splitlines()) != 1:
        problem = "holds a line break"
    else:
        try:
            name.encode("utf-8")
            return
        except UnicodeEncodeError:
            problem = "is not valid UTF-8"
    raise DatasetError(
        f"{where}: the class name {name!r} {problem}; labels.txt keeps one name a line, "
        "so rename it (or map it to another name with --class-map)"
    )


# How many unreadable files a refusal names (the count says how many more).
_BAD_FILES_SHOWN = 20


def _checked_hashes(root: Path, paths: Sequence[Path]) -> list[str]:
    """Each file's sha256, after decoding it as the gateway would; every file that does not
    decode is named in one :class:`DatasetError`.

    Checked here, as the folder is read, because inside the fit a bad file stopped
    training mid-epoch with a tf.data traceback naming only the first one (and once hung
    at shutdown), after minutes of work; evaluation after the fit would meet a bad test
    image only then. Decoding threads release the GIL, so the check runs on every core.
    """
    # The gateway's decoder, checks and limits; a small output keeps the resize cheap
    # (JPEGs decode scaled down, still reading every byte).
    spec = PreprocessSpec(height=32, width=32)

    def check(path: Path) -> tuple[str, str | None]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            return "", f"cannot be read ({exc.strerror or exc})"
        try:
            preprocess_bytes(data, spec, max_pixels=_FOLDER_MAX_PIXELS)
        except InvalidRequest as exc:  # undecodable, or more pixels than any photo
            return hashlib.sha256(data).hexdigest(), exc.message
        return hashlib.sha256(data).hexdigest(), None

    if len(paths) >= 1000:
        log.info("checking the %d images of %s", len(paths), root)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(check, paths))
    bad = [
        f"  {path}: {problem}" for path, (_, problem) in zip(paths, results, strict=True) if problem
    ]
    if bad:
        more = len(bad) - _BAD_FILES_SHOWN
        listing = "\n".join(bad[:_BAD_FILES_SHOWN] + ([f"  … and {more} more"] if more > 0 else []))
        raise DatasetError(
            f"{len(bad)} of the {len(paths)} files in {root} are not images the gateway can "
            f"decode; fix or remove them:\n{listing}"
        )
    return [digest for digest, _ in results]


# --- splitting -------------------------------------------------------------------------


@dataclass(frozen=True)
class OneCopyEach:
    """Which images to keep so that each content is there once: the first copy of an
    image held several times under one label, and no copy of an image held under
    different labels (nobody can say which is right; `cnnserve data audit` lists them).
    Identical copies land in one split (splits come from the content hash), so they were
    all kept: one test image scored twice, once wrong by construction."""

    keep: npt.NDArray[np.bool_]
    copies: int  # extra copies under the same label, dropped
    conflicting: int  # images dropped because their copies disagree on the label

    @classmethod
    def of(cls, hashes: Sequence[str], labels: Labels) -> OneCopyEach:
        first: dict[str, int] = {}
        conflicted: set[str] = set()
        for i, (digest, label) in enumerate(zip(hashes, labels.tolist(), strict=True)):
            if digest not in first:
                first[digest] = i
            elif labels[first[digest]] != label:
                conflicted.add(digest)
        keep = np.array(
            [first[d] == i and d not in conflicted for i, d in enumerate(hashes)], dtype=bool
        )
        conflicting = sum(d in conflicted for d in hashes)
        return cls(keep, len(hashes) - int(keep.sum()) - conflicting, conflicting)

    def say(self, where: str) -> None:
        if self.copies:
            log.warning("%s: dropped %d extra copies of identical images", where, self.copies)
        if self.conflicting:
            log.warning(
                "%s: dropped %d images whose identical copies carry different labels (see "
                "`cnnserve data audit`)",
                where,
                self.conflicting,
            )


def _bucket(content_hash: str, seed: int) -> float:
    """A stable number in [0, 1) per image content and seed."""
    digest = hashlib.sha256(f"{seed}:{content_hash}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_hash(
    images: ImageSet, fractions: Sequence[float], names: Sequence[str], seed: int
) -> list[ImageSet]:
    """Split by content hash, so duplicates can never straddle two splits."""
    edges = np.cumsum(fractions)
    if not np.isclose(edges[-1], 1.0):
        raise ValueError(f"split fractions must sum to 1, got {list(fractions)}")
    buckets = np.array([_bucket(h, seed) for h in images.hashes()])
    which = np.searchsorted(edges, buckets, side="right")
    return [
        images.subset(np.flatnonzero(which == i).astype(np.int64), name)
        for i, name in enumerate(names)
    ]


def check_disjoint(*splits: ImageSet) -> None:
    """Fail loudly if any image (by content hash) appears in two splits."""
    seen: dict[str, str] = {}
    for split in splits:
        for h in set(split.hashes()):
            if h in seen and seen[h] != split.name:
                raise DatasetError(
                    f"data leakage: an image with sha256 {h[:16]}… is in both "
                    f"'{seen[h]}' and '{split.name}'"
                )
            seen[h] = split.name


def _drop_known(images: ImageSet, known: set[str]) -> tuple[ImageSet, int]:
    keep = np.array([h not in known for h in images.hashes()])
    kept = images.subset(np.flatnonzero(keep).astype(np.int64), images.name)
    return kept, int((~keep).sum())


def make_splits(
    source: str | Path, *, data_dir: Path, val_fraction: float, test_fraction: float, seed: int
) -> Splits:
    """Deterministic, content-disjoint train/validation/test splits of a dataset.

    Fashion-MNIST keeps its official test set; validation is carved from the training
    set, and training images identical to a test image are dropped (and counted).
    """
    copies = conflicting = 0  # Fashion-MNIST's official sets are kept as published
    if str(source) == "fashion_mnist":
        train_full, test = load_fashion_mnist(data_dir)
        train_full, dropped = _drop_known(train_full, set(test.hashes()))
        train, val = split_by_hash(
            train_full, (1 - val_fraction, val_fraction), ("train", "validation"), seed
        )
        test = test.subset(np.arange(len(test), dtype=np.int64), "test")
    else:
        everything = load_image_folder(Path(source))
        once = OneCopyEach.of(everything.hashes(), everything.labels)
        once.say(str(source))
        everything = everything.subset(np.flatnonzero(once.keep).astype(np.int64), everything.name)
        copies, conflicting = once.copies, once.conflicting
        fractions = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
        train, val, test = split_by_hash(
            everything, fractions, ("train", "validation", "test"), seed
        )
        dropped = 0
    for split in (train, val, test):
        if len(split) == 0:
            raise DatasetError(f"the {split.name} split is empty; add images or change fractions")
    check_disjoint(train, val, test)
    if dropped:
        log.warning("dropped %d training images identical to test images", dropped)
    return Splits(
        train=train,
        validation=val,
        test=test,
        dropped_duplicates=dropped,
        dropped_copies=copies,
        dropped_conflicting_labels=conflicting,
    )


def oversample(labels: Labels, seed: int) -> npt.NDArray[np.int64]:
    """Indices that repeat minority-class examples until every class is as large as the
    largest; the original examples all stay."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels)
    target = counts.max()
    picks = [np.arange(len(labels))]
    for cls, count in enumerate(counts):
        if 0 < count < target:
            members = np.flatnonzero(labels == cls)
            picks.append(rng.choice(members, size=target - count, replace=True))
    return np.concatenate(picks).astype(np.int64)


def stratified(labels: npt.NDArray[np.generic], limit: int, seed: int) -> npt.NDArray[np.int64]:
    """Indices of ``limit`` items drawn at random, each class in proportion to its size
    (a plain random draw of 9 from 3 classes of 12 left one out; a class whose share is
    under one item may still be left out), in their order; the same for the same seed.
    Each class's items are shuffled and spread evenly over [0, 1); the ``limit`` lowest
    positions are kept."""
    rng = np.random.default_rng(seed)
    position = np.empty(len(labels))
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        order = rng.permutation(len(members))
        position[members[order]] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.sort(np.argsort(position, kind="stable")[:limit]).astype(np.int64)


def balanced_class_weight(labels: Labels) -> dict[int, float]:
    """``n / (k · n_c)`` per class present: each class weighs the same in the loss in total.

    The alternative to :func:`oversample` (``--class-weight balanced``). Neither invents
    images: SMOTE-style interpolation between two images of a class averages their pixels
    into a ghosted double exposure that no camera produces, so it is not offered; use
    oversampling with augmentation (every repeat differs), class weights, or more real
    images of the rare class.
    """
    counts = np.bincount(labels)
    present = np.flatnonzero(counts)
    return {int(c): float(len(labels) / (len(present) * counts[c])) for c in present}
