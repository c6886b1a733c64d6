"""`cnnserve verify`: does the live server answer what the offline evaluation measured?

The guard against train/serve skew. Each test image is encoded (PNG, lossless, and JPEG
at quality 90, what clients send) and classified by the live server, pinned to one
version; the same version's SavedModel signature classifies the very same bytes offline
through :mod:`service.preprocessing` with the preprocessing its training recorded. Top-1
agreement between the two must reach 99.9% for PNG and 99% for JPEG (room for another
JPEG decoder, as a TF Serving's in-graph one): only a skew between serving and training
can make them disagree. Agreement with the offline answers on the source pixels, never
encoded, is reported beside it: for JPEG it also counts what compression itself moves,
which is the model's sensitivity, not the server's fault, so it does not fail the run.
Disagreements are listed worst first (the offline model's margin for its own answer over
the server's) and their images saved.
"""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np
import numpy.typing as npt
from PIL import Image

from service.errors import DatasetError, InvalidImage
from service.preprocessing import (
    PreprocessSpec,
    decode,
    preprocess_array,
    preprocess_bytes,
    to_rgb,
)
from service.repository import read_card, read_labels, read_repository
from service.runtimes.card import FLOAT_PRECISION, artifact_precision
from service.training.data import (
    IMAGE_SUFFIXES,
    ImageSet,
    load_fashion_mnist,
    load_image_folder,
    stratified,
)
from service.verify_clients import PROBE, GrpcServer, RestServer, Served

ENCODINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "png": ("PNG", {}),
    "jpeg": ("JPEG", {"quality": 90}),
}
THRESHOLDS = {"png": 0.999, "jpeg": 0.99}
BATCH = 16  # images per request
CONCURRENCY = 4  # requests in flight
_MAX_PIXELS = 100_000_000


@dataclass
class TestImages:
    """Source images (decoded pixels) and their true class names (None: unknown)."""

    pixels: list[npt.NDArray[np.uint8]]
    classes: list[str | None]
    names: list[str]
    source: str = ""  # where they are from, said on stderr


def load_images(data: Path | None, fashion_mnist_dir: Path, limit: int) -> TestImages:
    """Fashion-MNIST's test set (``data`` None), a folder of class folders, or a flat
    folder of images; ``limit`` of them (0 = all): Fashion-MNIST's first (its test set is
    in no class order), a folder's drawn at random, the same each run (read class by
    class, its first N were its first classes only)."""
    if data is None:
        _, test = load_fashion_mnist(fashion_mnist_dir)
        count = len(test) if limit <= 0 else min(limit, len(test))
        assert test.pixels is not None
        return TestImages(
            pixels=[test.pixels[i] for i in range(count)],
            classes=[test.class_names[int(test.labels[i])] for i in range(count)],
            names=[f"t10k-{i}" for i in range(count)],
        )
    if not data.is_dir():
        raise DatasetError(f"image folder {data} does not exist")
    if any(p.is_dir() and not p.name.startswith(".") for p in data.iterdir()):
        folder = load_image_folder(data)
        assert folder.paths is not None
        paths = folder.paths
        classes: list[str | None] = [folder.class_names[int(y)] for y in folder.labels]
    else:
        paths = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        classes = [None] * len(paths)
    if 0 < limit < len(paths):
        drawn = stratified(np.array([str(c) for c in classes]), limit, seed=0)
        paths, classes = [paths[i] for i in drawn], [classes[i] for i in drawn]
    if not paths:
        raise DatasetError(f"{data} holds no images ({sorted(IMAGE_SUFFIXES)})")
    pixels = [
        np.asarray(to_rgb(decode(p.read_bytes(), max_pixels=_MAX_PIXELS)), dtype=np.uint8)
        for p in paths
    ]
    return TestImages(pixels, classes, [str(p.relative_to(data)) for p in paths])


def card_test_images(card: dict[str, Any], fashion_mnist_dir: Path, limit: int) -> TestImages:
    """The test split the version's card records (what `cnnserve evaluate` scores),
    ``limit`` of its images (0 = all; see :func:`load_images`): Fashion-MNIST's test
    set for a Fashion-MNIST model, the held-out images of the folders a folder-trained
    one was split from. Fashion-MNIST's images are not of a folder model's classes: its
    accuracy read "n/a" and its agreement measured the model on images it was never
    meant to see."""
    from service.training.evaluate import card_splits

    training = card.get("training")
    if not isinstance(training, dict):
        # No recipe (no card, or one written elsewhere): images to compare the server
        # and the offline model on all the same, said so (they may be of no class it knows).
        images = load_images(None, fashion_mnist_dir, limit)
        images.source = (
            "Fashion-MNIST's test set: this version's model card does not record its "
            "test split (give --data a folder of images of its classes)"
        )
        return images
    dataset, extra = training.get("dataset"), training.get("extra_datasets", [])
    if not isinstance(dataset, str) or not isinstance(extra, list):
        # A card written by hand: it said "tested on images from None".
        raise DatasetError(
            "this version's model card does not say which images it was trained and tested "
            "on (training.dataset); give --data a folder of images of its classes"
        )
    datasets = [dataset, *extra]
    if datasets == ["fashion_mnist"]:
        images = load_images(None, fashion_mnist_dir, limit)
        images.source = "Fashion-MNIST's test set, this version's test split"
        return images
    gone = [d for d in datasets if not (isinstance(d, str) and Path(d).is_dir())]
    if gone:
        raise DatasetError(
            f"this version was tested on images from {', '.join(map(str, gone))}, which is "
            "not a folder here (its model card's record); give --data a folder of images of "
            "its classes"
        )
    try:
        test = card_splits(card, None).test
    except (KeyError, TypeError) as exc:  # a card written by hand, or by something else
        raise DatasetError(
            f"this version's model card does not record its test split ({exc!r}); give "
            "--data a folder of images of its classes"
        ) from None
    test = test.sample(limit, seed=0)  # a folder split is in class order: not its first N
    count = len(test)
    sources = [_source(test, i) for i in range(count)]
    return TestImages(
        pixels=[pixels for pixels, _ in sources],
        classes=[test.class_names[int(test.labels[i])] for i in range(count)],
        names=[name for _, name in sources],
        source=f"this version's test split of {', '.join(datasets)} (its model card's record)",
    )


def _source(images: ImageSet, index: int) -> tuple[npt.NDArray[np.uint8], str]:
    """One image of a split as its source pixels, and its name (its file where it has one)."""
    if images.pixels is not None:
        return images.pixels[index], f"{images.name}-{index}"
    if images.parts is not None and images.part_index is not None:
        part, inner = images.part_index[index]
        return _source(images.parts[int(part)], int(inner))
    assert images.paths is not None
    path = images.paths[index]
    try:
        decoded = to_rgb(decode(path.read_bytes(), max_pixels=_MAX_PIXELS))
    except (OSError, InvalidImage) as exc:
        raise DatasetError(f"{path}: {getattr(exc, 'message', exc)}") from None
    return np.asarray(decoded, dtype=np.uint8), str(path)


def encode(pixels: npt.NDArray[np.uint8], encoding: str) -> bytes:
    fmt, options = ENCODINGS[encoding]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **options)
    return out.getvalue()


# --- the two sides ------------------------------------------------------------------------


def training_spec(card: dict[str, Any]) -> PreprocessSpec:
    """The preprocessing the version was trained with: the training config's record when
    the card has one, else the card's declared preprocessing."""
    recorded = card.get("training", {}).get("preprocess") or card.get("preprocessing") or {}
    return PreprocessSpec.from_card(recorded)


OfflineModel = Literal["auto", "artifact", "savedmodel"]


class Offline:
    """The version's model in this process: its SavedModel's serving signature
    (TensorFlow), or the LiteRT artifact it ships, which is what the gateway serves when
    that artifact is quantized (a float SavedModel would count int8's rounding as skew:
    a healthy int8 version agreed 99.2% and failed the 99.9% gate)."""

    def __init__(
        self,
        version_dir: Path,
        spec: PreprocessSpec,
        batch: int = 128,
        *,
        artifact_cache: Path | None = None,
        card: dict[str, Any] | None = None,
    ) -> None:
        """``artifact_cache``: run the LiteRT artifact (converted into this cache folder
        when the version ships none) instead of the SavedModel."""
        if artifact_cache is not None:
            from service.runtimes import create_runtime

            runtime = create_runtime(
                "litert", version_dir, cache_dir=artifact_cache, threads=0, card=card
            )
            runtime.load()
            self._predict: Any = runtime.predict
        else:
            from service.training.evaluate import load_signature

            self._predict = load_signature(version_dir)
        self.spec = spec
        self._batch = batch

    def _run(self, inputs: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
        out = [
            self._predict(np.stack(inputs[i : i + self._batch]))
            for i in range(0, len(inputs), self._batch)
        ]
        return np.concatenate(out)

    def on_pixels(self, images: TestImages) -> npt.NDArray[np.float32]:
        """What the offline evaluation measures: the source pixels, never encoded."""
        return self._run([preprocess_array(p, self.spec) for p in images.pixels])

    def on_bytes(self, encoded: Sequence[bytes]) -> npt.NDArray[np.float32]:
        """The very bytes the server got, decoded here: isolates the server's side from
        what the encoding itself changes."""
        return self._run(
            [preprocess_bytes(data, self.spec, max_pixels=_MAX_PIXELS) for data in encoded]
        )


# --- the comparison -------------------------------------------------------------------------


@dataclass
class EncodingResult:
    encoding: str
    served: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    # Served against offline on the same encoded bytes: below 100% only by a skew.
    agreement: float = 0.0
    # Served against offline on the source pixels: for a lossy encoding this also counts
    # the answers the encoding itself moves.
    agreement_source: float = 0.0
    accuracy_served: float | None = None
    threshold: float = 0.0
    disagreements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.agreement >= self.threshold


class Progress:
    """One line on stderr every ``period`` seconds: images done, rate."""

    def __init__(self, total: int, what: str, out: TextIO, period: float = 2.0) -> None:
        self.total, self.what, self.out, self.period = total, what, out, period
        self.done = 0
        self.started = self.last = time.monotonic()
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count
            now = time.monotonic()
            if now - self.last >= self.period or self.done == self.total:
                self.last = now
                rate = self.done / max(now - self.started, 1e-9)
                print(
                    f"verify: {self.what} {self.done}/{self.total} images ({rate:.0f}/s)",
                    file=self.out,
                    flush=True,
                )


def serve_all(
    server: RestServer | GrpcServer,
    images: TestImages,
    encoding: str,
    model: str,
    version: int,
    progress_out: TextIO,
) -> tuple[list[int], list[float], list[bytes]]:
    encoded = [encode(p, encoding) for p in images.pixels]
    progress = Progress(len(encoded), encoding, progress_out)
    chunks = [range(i, min(i + BATCH, len(encoded))) for i in range(0, len(encoded), BATCH)]

    def run(chunk: range) -> Served:
        answered_model, answered_version, served = server.classify(
            [encoded[i] for i in chunk], model, version
        )
        if (answered_model, answered_version) != (model, version):
            raise DatasetError(
                f"asked {model} version {version}, answered by {answered_model} "
                f"version {answered_version}"
            )
        progress.add(len(chunk))
        return served

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = [row for served in pool.map(run, chunks) for row in served]
    return [c for c, _ in results], [s for _, s in results], encoded


def compare(
    encoding: str,
    offline: npt.NDArray[np.float32],
    on_source: npt.NDArray[np.float32],
    served: list[int],
    scores: list[float],
    truth: list[int | None],
    labels: list[str],
    names: list[str],
) -> EncodingResult:
    """``offline``: the offline model on the bytes the server got; ``on_source``: on the
    source pixels."""
    offline_top = offline.argmax(axis=1)
    served_top = np.asarray(served)
    agree = offline_top == served_top
    known = [i for i, t in enumerate(truth) if t is not None]
    result = EncodingResult(
        encoding,
        served,
        scores,
        float(agree.mean()),
        float(np.mean(on_source.argmax(axis=1) == served_top)),
        threshold=THRESHOLDS[encoding],
    )
    if known:
        result.accuracy_served = float(np.mean([served[i] == truth[i] for i in known]))
    for i in np.flatnonzero(~agree):
        o, s = int(offline_top[i]), int(served_top[i])
        result.disagreements.append(
            {
                "index": int(i),
                "image": names[i],
                "true": labels[truth[i]] if truth[i] is not None else None,  # type: ignore[index]
                "offline": labels[o],
                "offline_score": float(offline[i, o]),
                "served": labels[s] if s < len(labels) else str(s),
                "served_score": float(scores[i]),
                "margin": float(offline[i, o] - offline[i, s]) if s < offline.shape[1] else 1.0,
            }
        )
    result.disagreements.sort(key=lambda d: -d["margin"])
    return result


@dataclass
class Report:
    model: str
    version: int
    server: str
    images: int
    accuracy_offline: float | None
    results: list[EncodingResult]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "server": self.server,
            "images": self.images,
            "accuracy_offline": self.accuracy_offline,
            "seconds": round(self.seconds, 1),
            "passed": self.passed,
            "encodings": {
                r.encoding: {
                    "agreement": r.agreement,
                    "agreement_source_pixels": r.agreement_source,
                    "threshold": r.threshold,
                    "passed": r.passed,
                    "accuracy_served": r.accuracy_served,
                    "disagreements": len(r.disagreements),
                    "worst": r.disagreements[:20],
                }
                for r in self.results
            },
        }


def _percent(value: float | None) -> str:
    if value is None:
        # Agreement still holds (the same bytes, both ways); accuracy needs labels.
        return "n/a (no image is of a class the model knows: give --data with its classes)"
    return f"{value:.2%}"


def print_report(report: Report, out: TextIO, show: int) -> None:
    print(
        f"verify {report.model} version {report.version} at {report.server}: "
        f"{report.images} images, {report.seconds:.1f}s",
        file=out,
    )
    print(f"  accuracy offline: {_percent(report.accuracy_offline)}", file=out)
    for r in report.results:
        verdict = "ok" if r.passed else "FAIL"
        print(
            f"  {r.encoding:<4}  accuracy served {_percent(r.accuracy_served)}  agreement "
            f"{r.agreement:.2%} with offline on the same bytes (>= {r.threshold:.1%}: "
            f"{verdict}; {len(r.disagreements)} disagree)",
            file=out,
        )
        print(
            f"        with offline on the source pixels {r.agreement_source:.2%}"
            + (
                f" (what {r.encoding.upper()} itself changes: the model's sensitivity to "
                "the encoding, not a skew)"
                if r.agreement_source < r.agreement
                else ""
            ),
            file=out,
        )
        for d in r.disagreements[:show]:
            print(
                f"    {d['image']}: offline {d['offline']} ({d['offline_score']:.3f}), served "
                f"{d['served']} ({d['served_score']:.3f}), true {d['true']}",
                file=out,
            )


def save_disagreements(
    report: Report, encoded: dict[str, list[bytes]], output: Path, count: int
) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for r in report.results:
        suffix = "png" if r.encoding == "png" else "jpg"
        for rank, d in enumerate(r.disagreements[:count]):
            safe = "".join(c if c.isalnum() else "_" for c in f"{d['offline']}-vs-{d['served']}")
            path = output / f"{r.encoding}-{rank:02d}-image{d['index']}-{safe}.{suffix}"
            path.write_bytes(encoded[r.encoding][d["index"]])
            d["saved"] = str(path)
    (output / "report.json").write_text(json.dumps(report.to_dict(), indent=2))


def run_verify(
    server: RestServer | GrpcServer,
    *,
    repository: Path,
    cache_dir: Path,
    images: Callable[[dict[str, Any]], TestImages],
    model: str | None,
    version: int | None,
    label: str | None,
    output: Path | None,
    show: int = 10,
    out: TextIO | None = None,
    progress_out: TextIO | None = None,
    offline_model: OfflineModel = "auto",
) -> Report:
    """Verify; the report goes to ``out`` (stdout), progress to ``progress_out`` (stderr).
    ``images``: the test images, given the version's model card (:func:`card_test_images`).
    ``cache_dir``: where an artifact the version does not ship is converted, for
    ``--offline artifact`` (the settings' CNNSERVE_CACHE_DIR, as the server's)."""
    out = out or sys.stdout
    progress_out = progress_out or sys.stderr
    started = time.monotonic()
    if label is not None:
        version = server.label_version(model, label)
        print(f"verify: label {label!r} is version {version}", file=progress_out)
    if model is None or version is None:
        model, version, _ = server.classify([PROBE], model, version)
        print(f"verify: the server answers with {model} version {version}", file=progress_out)
    version_dir = _version_dir(repository, model, version)
    card = read_card(version_dir)
    _check_same_model(server, model, version, version_dir, card)
    test_images = images(card)
    if test_images.source:
        print(f"verify: test images: {test_images.source}", file=progress_out)
    spec = training_spec(card)
    print(
        f"verify: offline predictions of {version_dir} ({spec.resize_method} resize)",
        file=progress_out,
    )
    precision = artifact_precision(card)
    artifact = offline_model == "artifact" or (
        offline_model == "auto" and precision != FLOAT_PRECISION
    )
    if artifact:
        what = (
            f"its {precision} LiteRT artifact (what the gateway serves; against a TF "
            "Serving, which serves the SavedModel, pass --offline savedmodel)"
        )
    else:
        what = "the SavedModel"
    print(f"verify: offline model: {what}", file=progress_out)
    model_offline = Offline(
        version_dir, spec, artifact_cache=cache_dir if artifact else None, card=card
    )
    offline = model_offline.on_pixels(test_images)
    labels = read_labels(version_dir, offline.shape[1])
    index = {name: i for i, name in enumerate(labels)}
    truth = [index.get(c) if c is not None else None for c in test_images.classes]
    known = [i for i, t in enumerate(truth) if t is not None]
    accuracy_offline = (
        float(np.mean([offline[i].argmax() == truth[i] for i in known])) if known else None
    )
    results, encoded = [], {}
    for encoding in ENCODINGS:
        served, scores, encoded[encoding] = serve_all(
            server, test_images, encoding, model, version, progress_out
        )
        same_bytes = model_offline.on_bytes(encoded[encoding])
        results.append(
            compare(encoding, same_bytes, offline, served, scores, truth, labels, test_images.names)
        )
    report = Report(
        model,
        version,
        server.url,
        len(test_images.pixels),
        accuracy_offline,
        results,
        time.monotonic() - started,
    )
    if output is not None:
        save_disagreements(report, encoded, output, show)
    print_report(report, out, show)
    if label is not None:
        _check_label_stayed(server, model, label, version)
    return report


def _check_label_stayed(
    server: RestServer | GrpcServer, model: str, label: str, version: int
) -> None:
    """A label moved while verify ran: the report is of the version it named when the
    run began (each request named that version), not of what the label names now, and
    a gate reading exit 0 took it for the label's (an outside audit, 12-07)."""
    now = server.label_version(model, label)
    if now != version:
        raise DatasetError(
            f"label {label!r} moved from version {version} to {now} while this ran: the "
            f"report above is of version {version}; rerun to check version {now}"
        )


def _check_same_model(
    server: RestServer | GrpcServer,
    model: str,
    version: int,
    version_dir: Path,
    card: dict[str, Any],
) -> None:
    """Refuse to judge a server that serves another model under the same name and
    number (a different repository): the comparison would read as a train/serve skew
    (25% agreement, exit 1) that no serving fault caused. Known when the server shows
    its card (cnnserve's REST demo route); else the comparison speaks for itself."""
    served = server.served_card(model, version) if isinstance(server, RestServer) else None
    if not served:
        return
    ours, theirs = card.get("created_at"), served.get("created_at")
    if ours and theirs and ours != theirs:
        raise DatasetError(
            f"{server.url} serves another {model} version {version} than {version_dir} (its "
            f"model card was created {theirs}, this one {ours}): point --model-repository "
            "at the repository the server serves, or, if it is that one, the version folder "
            "was replaced since the server loaded it (publish a change as a new version "
            "number; the server's log says so)"
        )


def _version_dir(repository: Path, model: str, version: int) -> Path:
    base = next((c.base_path for c in read_repository(repository) if c.name == model), None)
    path = (base or repository / model) / str(version)
    if not path.is_dir():
        raise DatasetError(
            f"{path} does not exist: verify compares with the version's SavedModel; point "
            "--model-repository at the repository the server was deployed from"
        )
    return path
