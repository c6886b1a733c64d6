"""Several datasets as one: merge sources, map their class names, apply reviewed label
corrections, and split them by content hash globally.

A source is ``fashion_mnist`` (its official test set stays the test set) or a folder of
class folders. A class-mapping file translates source class names into the classes the
model learns, one rule a line::

    # source_class -> class
    tshirt -> T-shirt/top
    sneakers -> Sneaker

Without a map every source must name the same classes. With one, the first source's
classes (translated where a rule names them) and the rules' right sides are the classes;
a source class that is none of these and no rule's left side is refused
(:class:`DatasetError`), so a new class needs an explicit ``hat -> hat``.

Each image's split comes from its content hash, exactly as for one source; an image held
by two sources keeps only the copy in the most held-out split (test, then validation), so
the same picture can never be trained on and tested on. One source with no map and no
corrections goes through :func:`service.training.data.make_splits` unchanged.

Label corrections (written by ``cnnserve data audit --fix``) are keyed by the image's
sha256, so they follow the image whatever its file name or source; source files are never
modified.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.errors import DatasetError
from service.training.data import (
    ImageSet,
    OneCopyEach,
    Splits,
    _bucket,
    check_disjoint,
    load_fashion_mnist,
    load_image_folder,
    make_splits,
)

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")
RELABEL_FORMAT = "cnnserve-relabel/1"


@dataclass
class Source:
    """One dataset as loaded: ``pool`` is split by hash; ``test`` is an official test set."""

    name: str
    kind: str
    pool: ImageSet
    test: ImageSet | None = None

    def parts(self) -> list[ImageSet]:
        return [self.pool] if self.test is None else [self.pool, self.test]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for part in self.parts():
            digest.update(part.fingerprint().encode())
        return digest.hexdigest()


def load_source(name: str, data_dir: Path) -> Source:
    if name == "fashion_mnist":
        train, test = load_fashion_mnist(data_dir)
        return Source(name=name, kind="fashion_mnist", pool=train, test=test)
    return Source(name=name, kind="folder", pool=load_image_folder(Path(name)))


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_class_map(path: Path) -> dict[str, str]:
    """``source_class -> class`` rules; blank lines and ``#`` comments are skipped."""
    if not path.is_file():
        raise DatasetError(f"class map {path} does not exist")
    try:
        # -sig: a BOM an editor put first would otherwise start the first class's name.
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"class map {path} is not UTF-8 text ({exc}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise DatasetError(f"cannot read class map {path}: {exc.strerror or exc}") from None
    rules: dict[str, str] = {}
    for number, line in enumerate(content.splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        left, arrow, right = text.partition("->")
        if not arrow or not left.strip() or not right.strip():
            raise DatasetError(f"{path}:{number}: expected 'source_class -> class', got {line!r}")
        rules[left.strip()] = right.strip()
    return rules


def read_relabel(path: Path) -> dict[str, str]:
    """The reviewed corrections ``cnnserve data audit --fix`` wrote: sha256 → class name."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read label corrections {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != RELABEL_FORMAT:
        raise DatasetError(f"{path} is not a corrections file from `cnnserve data audit --fix`")
    corrections = data.get("corrections")
    if not isinstance(corrections, dict):
        raise DatasetError(
            f'{path} has no "corrections" object (sha256 -> class); write it again with '
            "`cnnserve data audit --fix`"
        )
    return {str(k): str(v) for k, v in corrections.items()}


def target_classes(sources: Sequence[Source], class_map: dict[str, str] | None) -> list[str]:
    """The merged class list (first appearance order); refuses classes nobody mapped."""
    if class_map is None:
        first = sources[0].pool.class_names
        for source in sources[1:]:
            if set(source.pool.class_names) != set(first):
                extra = sorted(set(source.pool.class_names) ^ set(first))
                raise DatasetError(
                    f"sources {sources[0].name!r} and {source.name!r} name different classes "
                    f"({', '.join(extra)}); give --class-map with 'source_class -> class' rules"
                )
        return list(first)
    # The first source names the classes; the map translates the others (and may add one).
    known = {c for source in sources for c in source.pool.class_names}
    if unused := [c for c in class_map if c not in known]:  # a typo did nothing, unsaid
        log.warning(
            "class map rule(s) for %s match no class of any source (classes: %s)",
            ", ".join(repr(c) for c in unused),
            ", ".join(sorted(known)),
        )
    targets = set(class_map.values()) | {class_map.get(c, c) for c in sources[0].pool.class_names}
    names: list[str] = []
    for source in sources:
        unmapped = [c for c in source.pool.class_names if c not in class_map and c not in targets]
        if unmapped:
            raise DatasetError(
                f"class(es) {', '.join(repr(c) for c in unmapped)} of source {source.name!r} "
                "are not mapped: add '<source_class> -> <class>' lines to the class map"
            )
        for c in source.pool.class_names:
            mapped = class_map.get(c, c)
            if mapped not in names:
                names.append(mapped)
    return names


def _concat(
    sets: Sequence[ImageSet], labels: npt.NDArray[np.int64], classes: list[str]
) -> ImageSet:
    hashes = [h for s in sets for h in s.hashes()]
    pixels = [s.pixels for s in sets]
    if (
        all(p is not None for p in pixels)
        and len({p.shape[1:] for p in pixels if p is not None}) == 1
    ):
        stacked = np.concatenate([p for p in pixels if p is not None])
        return ImageSet("merged", classes, labels, pixels=stacked, _hashes=hashes)
    if all(s.paths is not None for s in sets):
        paths = [p for s in sets for p in (s.paths or [])]
        return ImageSet("merged", classes, labels, paths=paths, _hashes=hashes)
    index = np.concatenate(
        [np.stack([np.full(len(s), i), np.arange(len(s))], axis=1) for i, s in enumerate(sets)]
    ).astype(np.int64)
    return ImageSet("merged", classes, labels, _hashes=hashes, parts=list(sets), part_index=index)


@dataclass
class Merged:
    images: ImageSet
    split: npt.NDArray[np.int64]  # 0 train, 1 validation, 2 test per image
    source: npt.NDArray[np.int64]  # index into the source list per image
    provenance: dict[str, object]
    dropped: int
    relabelled: int = 0
    copies: int = 0  # see service.training.data.OneCopyEach
    conflicting: int = 0


def merge(
    sources: Sequence[Source],
    *,
    class_map: dict[str, str] | None,
    corrections: dict[str, str] | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> Merged:
    """All sources as one labelled set, each image with its split (see module docstring)."""
    classes = target_classes(sources, class_map)
    mapping = class_map or {}
    sets: list[ImageSet] = []
    labels: list[npt.NDArray[np.int64]] = []
    splits: list[npt.NDArray[np.int64]] = []
    owner: list[npt.NDArray[np.int64]] = []
    for number, src in enumerate(sources):
        remap = np.array(
            [classes.index(mapping.get(c, c)) for c in src.pool.class_names], dtype=np.int64
        )
        edges = (
            np.cumsum((1 - val_fraction, val_fraction))
            if src.test is not None
            else np.cumsum((1 - val_fraction - test_fraction, val_fraction, test_fraction))
        )
        buckets = np.array([_bucket(h, seed) for h in src.pool.hashes()])
        splits.append(np.minimum(np.searchsorted(edges, buckets, side="right"), 2))
        for part in src.parts():
            sets.append(part)
            labels.append(remap[part.labels])
            owner.append(np.full(len(part), number, dtype=np.int64))
        if src.test is not None:
            splits.append(np.full(len(src.test), 2, dtype=np.int64))
    label = np.concatenate(labels)
    split = np.concatenate(splits).astype(np.int64)
    source = np.concatenate(owner)
    images = _concat(sets, label, classes)
    hashes = images.hashes()

    applied = not_found = 0
    if corrections:
        unknown = sorted({c for c in corrections.values() if c not in classes})
        if unknown:
            raise DatasetError(f"label corrections name unknown classes: {', '.join(unknown)}")
        position: dict[str, list[int]] = {}
        for i, h in enumerate(hashes):
            position.setdefault(h, []).append(i)
        for h, name in corrections.items():
            for i in position.get(h, []):  # counted when the label changes, not matches
                applied += int(label[i] != classes.index(name))
                label[i] = classes.index(name)
            not_found += h not in position
        if not_found:
            log.warning("%d label corrections match no image of these sources", not_found)

    # One split per content: the most held-out copy wins, the others are dropped.
    best: dict[str, int] = {}
    for h, s in zip(hashes, split.tolist(), strict=True):
        best[h] = max(best.get(h, 0), s)
    keep = np.array([best[h] == s for h, s in zip(hashes, split.tolist(), strict=True)])
    provenance: dict[str, object] = {
        "sources": [
            {
                "name": src.name,
                "kind": src.kind,
                "images": int((source == n).sum()),
                "content_sha256": src.fingerprint(),
                "per_class": {
                    c: int(((source == n) & (label == k)).sum()) for k, c in enumerate(classes)
                },
            }
            for n, src in enumerate(sources)
        ],
    }
    dropped = int((~keep).sum())
    kept = np.flatnonzero(keep)
    once = OneCopyEach.of([hashes[i] for i in kept], label[kept])
    keep[kept[~once.keep]] = False
    once.say("merged sources")
    return Merged(
        images,
        np.where(keep, split, -1),
        source,
        provenance,
        dropped,
        applied,
        copies=once.copies,
        conflicting=once.conflicting,
    )


def load_splits(
    datasets: Sequence[str],
    *,
    data_dir: Path,
    class_map: Path | None = None,
    relabel: Path | None = None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> Splits:
    """Train/validation/test of one or several sources, content-disjoint."""
    if len(datasets) == 1 and class_map is None and relabel is None:
        return make_splits(
            datasets[0],
            data_dir=data_dir,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
        )
    sources = [load_source(name, data_dir) for name in datasets]
    rules = read_class_map(class_map) if class_map is not None else None
    corrections = read_relabel(relabel) if relabel is not None else None
    merged = merge(
        sources,
        class_map=rules,
        corrections=corrections,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    parts = [
        merged.images.subset(np.flatnonzero(merged.split == k).astype(np.int64), name)
        for k, name in enumerate(SPLIT_NAMES)
    ]
    for split in parts:
        if len(split) == 0:
            raise DatasetError(f"the {split.name} split is empty; add images or change fractions")
    check_disjoint(*parts)
    provenance = dict(merged.provenance)
    if class_map is not None:
        provenance["class_map"] = {
            "file": str(class_map),
            "sha256": _file_sha256(class_map),
            "rules": rules,
        }
    if relabel is not None and corrections is not None:
        provenance["label_corrections"] = {
            "file": str(relabel),
            "sha256": _file_sha256(relabel),
            "corrections": len(corrections),
            "images_relabelled": merged.relabelled,
        }
    log.info("dataset sources:\n%s", counts_table(provenance, merged.images.class_names))
    if merged.dropped:
        log.warning("dropped %d copies of images held by a more held-out split", merged.dropped)
    train, validation, test = parts
    return Splits(
        train,
        validation,
        test,
        merged.dropped,
        provenance,
        dropped_copies=merged.copies,
        dropped_conflicting_labels=merged.conflicting,
    )


def counts_table(provenance: dict[str, object], classes: list[str]) -> str:
    """Per-source, per-class counts as a plain-text table."""
    sources = provenance.get("sources", [])
    assert isinstance(sources, list)
    width = max([len(c) for c in classes] + [5])
    head = f"{'class':<{width}} " + " ".join(f"{s['name'][-18:]:>18}" for s in sources)
    rows = [head]
    for c in [*classes, "total"]:
        cells = [s["images"] if c == "total" else s["per_class"][c] for s in sources]
        rows.append(f"{c:<{width}} " + " ".join(f"{v:>18}" for v in cells))
    return "\n".join(rows)
