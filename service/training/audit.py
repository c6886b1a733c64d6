"""`cnnserve data audit`: class balance, exact and near duplicates, likely label errors.

The audit reads the same merged sources and splits as training (service.training.sources)
and never writes to them; everything goes under the output folder:

    audit.json           every number below
    summary.md           the report, linking the PNGs
    class_balance.png    images per class and split
    duplicates.csv       exact (sha256) and near (perceptual hash) duplicates, with files;
                         exact first, then cross-split pairs, most alike first
    duplicates.png       the first pairs side by side
    label_issues.csv     likely label errors, most suspicious first; fill `corrected_label`
                         and pass the reviewed file to `--fix`
    label_issues.png     the top suspects with their given and suggested labels

Near duplicates: a 64-bit pHash (DCT of a 32×32 grey thumbnail) within ``hash_distance``
bits, confirmed by a mean absolute difference of the thumbnails under ``pixel_distance``
(of 255), so similar-looking but different pictures are not reported.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from service.errors import DatasetError
from service.preprocessing import PreprocessSpec
from service.training.label_issues import find_label_issues, out_of_fold_probs
from service.training.sources import (
    RELABEL_FORMAT,
    SPLIT_NAMES,
    Merged,
    load_source,
    merge,
    read_class_map,
)

Progress = Callable[[str], None]
THUMB = 32


@dataclass(frozen=True)
class AuditConfig:
    folds: int = 4
    epochs: int = 3
    hash_distance: int = 4
    pixel_distance: float = 6.0
    top: int = 24  # suspects shown in the gallery
    limit: int = 0  # audit N images drawn from every source and split (0 = all)
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1


@dataclass
class Dataset:
    """The merged sources as the audit sees them: small pixels, labels, names, splits."""

    pixels: npt.NDArray[np.uint8]  # native 28×28 for same-size grey sources, else 32×32 RGB
    labels: npt.NDArray[np.int64]
    classes: list[str]
    ids: list[str]  # a file path, or "<set>#<index>"
    hashes: list[str]
    split: list[str]
    provenance: dict[str, object] = field(default_factory=dict)


def load(
    datasets: Sequence[str], *, data_dir: Path, class_map: Path | None, cfg: AuditConfig
) -> Dataset:
    sources = [load_source(name, data_dir) for name in datasets]
    merged = merge(
        sources,
        class_map=read_class_map(class_map) if class_map else None,
        corrections=None,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
    )
    ids = [
        str(part.paths[i]) if part.paths is not None else f"{part.name}#{i}"
        for src in sources
        for part in src.parts()
        for i in range(len(part))
    ]
    picked = np.arange(len(ids))
    if cfg.limit and cfg.limit < len(ids):
        # Drawn from the whole: the first N were all of the first source's training
        # images, so a leak into the test split or another source could not show.
        picked = np.sort(np.random.default_rng(cfg.seed).choice(len(ids), cfg.limit, False))
    hashes = merged.images.hashes()
    return Dataset(
        pixels=_small_pixels(merged, picked),
        labels=merged.images.labels[picked],
        classes=merged.images.class_names,
        ids=[ids[i] for i in picked.tolist()],
        hashes=[hashes[i] for i in picked.tolist()],
        split=[SPLIT_NAMES[s] if s >= 0 else "dropped" for s in merged.split[picked].tolist()],
        provenance=merged.provenance,
    )


def _small_pixels(merged: Merged, picked: npt.NDArray[np.intp]) -> npt.NDArray[np.uint8]:
    images = merged.images
    if images.pixels is not None and images.pixels.ndim == 3:
        return images.pixels[picked]  # Fashion-MNIST: native 28×28 grey
    spec = PreprocessSpec(height=THUMB, width=THUMB)
    return np.stack([images.model_input(i, spec) for i in picked.tolist()])


# --- class balance ---------------------------------------------------------------------


def balance(data: Dataset) -> dict[str, Any]:
    per_split = {
        name: np.bincount(
            data.labels[np.array(data.split) == name], minlength=len(data.classes)
        ).tolist()
        for name in (*SPLIT_NAMES, "dropped")
        if name in data.split
    }
    total = np.bincount(data.labels, minlength=len(data.classes))
    present = total[total > 0]
    return {
        "classes": data.classes,
        "total": total.tolist(),
        "per_split": per_split,
        "imbalance_ratio": float(present.max() / present.min()) if len(present) else 0.0,
        "smallest_class": data.classes[int(np.argmin(np.where(total > 0, total, 1 << 62)))],
        "largest_class": data.classes[int(np.argmax(total))],
    }


# --- duplicates ------------------------------------------------------------------------


def grey_thumbnails(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    grey = pixels.astype(np.float32)
    if grey.ndim == 4:
        grey = np.asarray(grey @ np.array([0.299, 0.587, 0.114], np.float32), np.float32)
    if grey.shape[1:] == (THUMB, THUMB):
        return grey
    return np.stack(
        [
            np.asarray(Image.fromarray(g).resize((THUMB, THUMB), Image.Resampling.BILINEAR))
            for g in grey
        ]
    ).astype(np.float32)


def _dct_matrix(n: int) -> npt.NDArray[np.float32]:
    k = np.arange(n)[:, None]
    return np.asarray(np.cos(np.pi / n * (np.arange(n)[None, :] + 0.5) * k), np.float32)


def phash(thumbs: npt.NDArray[np.float32]) -> npt.NDArray[np.uint64]:
    """64-bit perceptual hashes: the 8×8 lowest DCT frequencies against their median."""
    d = _dct_matrix(THUMB)
    low = np.asarray(d @ thumbs @ d.T, dtype=np.float32)[:, :8, :8].reshape(len(thumbs), 64)
    bits = low > np.median(low[:, 1:], axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64)


def _popcount(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[x[..., None].view(np.uint8)].sum(axis=-1, dtype=np.uint8)  # type: ignore[no-any-return]


def duplicates(data: Dataset, cfg: AuditConfig, progress: Progress) -> list[dict[str, Any]]:
    """Exact duplicates (same sha256) and near duplicates (pHash + pixel check)."""
    found: list[dict[str, Any]] = []
    first: dict[str, int] = {}
    exact: set[tuple[int, int]] = set()
    for j, h in enumerate(data.hashes):
        if h in first:
            exact.add((first[h], j))
            found.append(_pair(data, first[h], j, "exact", 0, 0.0))
        else:
            first.setdefault(h, j)
    thumbs = grey_thumbnails(data.pixels)
    hashes = phash(thumbs)
    chunk = 256
    for start in range(0, len(hashes), chunk):
        if start % (chunk * 40) == 0:
            progress(f"near duplicates: {start}/{len(hashes)} images compared")
        block = hashes[start : start + chunk]
        dist = _popcount(block[:, None] ^ hashes[None, :])
        rows, cols = np.nonzero(dist <= cfg.hash_distance)
        for r, j in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + r
            if j <= i or (i, j) in exact or data.hashes[i] == data.hashes[j]:
                continue
            mad = float(np.abs(thumbs[i] - thumbs[j]).mean())
            if mad <= cfg.pixel_distance:
                found.append(_pair(data, i, j, "near", int(dist[r, j]), mad))
    return found


def _pair(data: Dataset, i: int, j: int, kind: str, bits: int, mad: float) -> dict[str, Any]:
    return {
        "kind": kind,
        "a": data.ids[i],
        "b": data.ids[j],
        "a_index": i,
        "b_index": j,
        "split_a": data.split[i],
        "split_b": data.split[j],
        # A copy training dropped is in no split: no leak, whatever its twin's split.
        "cross_split": "dropped" not in (data.split[i], data.split[j])
        and data.split[i] != data.split[j],
        "label_a": data.classes[data.labels[i]],
        "label_b": data.classes[data.labels[j]],
        "hash_bits": bits,
        "pixel_distance": round(mad, 2),
    }


# --- the whole audit ---------------------------------------------------------------------


def run_audit(data: Dataset, output: Path, cfg: AuditConfig, progress: Progress) -> dict[str, Any]:
    from service.training.audit_report import (
        class_balance_png,
        duplicates_png,
        gallery_png,
        write_summary,
    )

    output.mkdir(parents=True, exist_ok=True)
    if len(set(data.labels.tolist())) < 2:
        raise DatasetError("the audit needs images of at least two classes")
    progress(f"{len(data.labels)} images, {len(data.classes)} classes")
    report: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "images": len(data.labels),
        "config": {k: v for k, v in cfg.__dict__.items()},
        "dataset": data.provenance,
        "balance": balance(data),
    }
    class_balance_png(report["balance"], output / "class_balance.png")

    progress("duplicates: hashing")
    pairs = duplicates(data, cfg, progress)
    # Exact first, then those crossing splits (leakage), each most alike first.
    pairs.sort(key=lambda p: (p["kind"] != "exact", not p["cross_split"], p["pixel_distance"]))
    duplicates_png(data, pairs, output / "duplicates.png", cfg.top // 2)
    _write_csv(output / "duplicates.csv", pairs, list(_pair(data, 0, 0, "", 0, 0.0)))
    report["duplicates"] = {
        "exact_pairs": sum(p["kind"] == "exact" for p in pairs),
        "near_pairs": sum(p["kind"] == "near" for p in pairs),
        "cross_split_pairs": sum(p["cross_split"] for p in pairs),
        "first": pairs[:20],
    }

    progress(f"label issues: {cfg.folds}-fold out-of-fold probabilities, {cfg.epochs} epochs")
    probs = out_of_fold_probs(
        data.pixels,
        data.labels,
        len(data.classes),
        folds=cfg.folds,
        epochs=cfg.epochs,
        seed=cfg.seed,
        progress=progress,
    )
    issues = find_label_issues(data.labels, probs)
    rows = [
        {
            "rank": rank + 1,
            "id": data.ids[i],
            "sha256": data.hashes[i],
            "split": data.split[i],
            "given_label": data.classes[data.labels[i]],
            "suggested_label": data.classes[s],
            "score": round(float(score), 5),
            "corrected_label": "",
        }
        for rank, (i, s, score) in enumerate(
            zip(issues.indices.tolist(), issues.suggested.tolist(), issues.scores, strict=True)
        )
    ]
    _write_csv(
        output / "label_issues.csv",
        rows,
        [
            "rank",
            "id",
            "sha256",
            "split",
            "given_label",
            "suggested_label",
            "score",
            "corrected_label",
        ],
    )
    gallery_png(data, issues, output / "label_issues.png", cfg.top)
    accuracy = float(np.mean(probs.argmax(axis=1) == data.labels))
    report["label_issues"] = {
        "method": "confident learning, prune by noise rate (Northcutt et al. 2021)",
        "flagged": len(rows),
        "flagged_fraction": len(rows) / len(data.labels),
        "estimated_label_accuracy": issues.estimated_accuracy,
        "target_label_accuracy": 0.99,
        "meets_target": issues.estimated_accuracy >= 0.99,
        "out_of_fold_model_accuracy": accuracy,
        "top": rows[:20],
    }
    (output / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    write_summary(report, output / "summary.md")
    progress(f"written to {output}")
    return report


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    # UTF-8 whatever the locale: --fix reads the reviewed copy back as UTF-8.
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_fix(data: Dataset, reviewed: Path, output: Path) -> Path:
    """Reviewed corrections (rows of `label_issues.csv` whose `corrected_label` is filled)
    → ``output/relabel.json``, which `cnnserve train --relabel` applies by sha256."""
    if not reviewed.is_file():
        what = "are a folder; give the CSV file" if reviewed.is_dir() else "do not exist"
        raise DatasetError(f"reviewed corrections {reviewed} {what}")
    try:
        with reviewed.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except UnicodeDecodeError as exc:  # a spreadsheet's own format or another encoding
        raise DatasetError(
            f"reviewed corrections {reviewed} are not UTF-8 text ({exc}); save them as CSV (UTF-8)"
        ) from None
    except csv.Error as exc:
        raise DatasetError(f"reviewed corrections {reviewed} are not a CSV file: {exc}") from None
    if rows and not {"sha256", "corrected_label"} <= set(rows[0]):
        raise DatasetError(f"{reviewed} needs the columns sha256 and corrected_label")
    known = set(data.hashes)
    corrections: dict[str, str] = {}
    row_of: dict[str, int] = {}
    problems: list[str] = []  # every row's, not only the first one's
    for number, row in enumerate(rows, 2):
        label = (row.get("corrected_label") or "").strip()
        if not label:
            continue
        digest = (row.get("sha256") or "").strip()
        if label not in data.classes:
            problems.append(f"{reviewed}:{number}: {label!r} is not a class of this dataset")
        elif not digest:
            problems.append(f"{reviewed}:{number}: the sha256 column is empty")
        elif digest not in known:
            problems.append(f"{reviewed}:{number}: no image of these sources has that sha256")
        elif corrections.get(digest, label) != label:  # the last row won, unsaid
            problems.append(
                f"{reviewed}:{number}: corrects the image of row {row_of[digest]} to "
                f"{label!r}, that row to {corrections[digest]!r}; keep one"
            )
        else:
            corrections[digest] = label
            row_of.setdefault(digest, number)
    if problems:
        classes = ", ".join(data.classes)
        raise DatasetError("\n".join([*problems, f"(the classes: {classes})"]))
    output.mkdir(parents=True, exist_ok=True)
    path = output / "relabel.json"
    path.write_text(
        json.dumps(
            {
                "format": RELABEL_FORMAT,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "reviewed_file": str(reviewed),
                "sources": data.provenance.get("sources", []),
                "corrections": corrections,
            },
            indent=2,
        )
        + "\n"
    )
    return path
