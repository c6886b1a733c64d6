"""Evaluation: accuracy, per-class precision/recall/F1 and average precision (mAP),
confusion matrix, latency.

The same code scores a model at export time (its numbers go into the model card) and
a published version later (`cnnserve evaluate`), through the serving signature, or the
quantized LiteRT artifact where the version ships one (the gateway serves that), so the
report describes what the gateway serves.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# Figure, not pyplot: it draws without selecting a global backend (no side effect on import).
from matplotlib.figure import Figure

from service.contract import INPUT_NAME, OUTPUT_NAME, SERVING_SIGNATURE
from service.errors import DatasetError, ModelLoadError
from service.preprocessing import PreprocessSpec
from service.repository import load_card
from service.training.data import ImageSet, Splits
from service.training.pipeline import batches
from service.training.sources import load_splits

log = logging.getLogger(__name__)

Predict = Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.float32]]


def average_precision(positive: npt.NDArray[np.bool_], scores: npt.NDArray[Any]) -> float | None:
    """One-vs-rest average precision: the area under the precision-recall step curve,
    sum over thresholds of (R_k - R_k-1) * P_k, tied scores forming one threshold (the
    definition scikit-learn's ``average_precision_score`` uses). None without positives."""
    total = int(positive.sum())
    if total == 0:
        return None
    order = np.argsort(-scores, kind="mergesort")
    ranked, hits = scores[order], positive[order]
    tp = np.cumsum(hits)
    # The last position of each distinct score: a threshold takes all of its ties.
    cut = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    tp_at = tp[cut].astype(np.float64)
    precision = tp_at / (cut + 1)
    recall = tp_at / total
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def classification_report(
    labels: npt.NDArray[np.int64],
    predicted: npt.NDArray[np.int64],
    class_names: list[str],
    probabilities: npt.NDArray[np.float32] | None = None,
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1, their macro means and the confusion
    matrix; with ``probabilities`` also per-class average precision and their mean (mAP,
    one-vs-rest, over the classes that have test examples)."""
    n = len(class_names)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted_count = confusion.sum(axis=0)
    precision = np.divide(tp, predicted_count, out=np.zeros(n), where=predicted_count > 0)
    recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(n), where=denom > 0)
    # Macro means over the classes with test examples (as mAP): a class with none has no
    # recall to measure, and counting its 0 would make the mean depend on the split.
    present = support > 0
    report: dict[str, Any] = {
        "examples": len(labels),
        "accuracy": float(tp.sum() / max(1, len(labels))),
        "macro_precision": _mean(precision[present]),
        "macro_recall": _mean(recall[present]),
        "macro_f1": _mean(f1[present]),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": {"labels": class_names, "rows_true_cols_predicted": confusion.tolist()},
    }
    if not present.all():
        report["classes_without_examples"] = [
            c for c, p in zip(class_names, present, strict=True) if not p
        ]
    if probabilities is not None:
        ap = [average_precision(labels == i, probabilities[:, i]) for i in range(n)]
        for name, value in zip(class_names, ap, strict=True):
            report["per_class"][name]["average_precision"] = value
        defined = [value for value in ap if value is not None]
        report["mean_average_precision"] = float(np.mean(defined)) if defined else None
    return report


def _mean(values: npt.NDArray[np.float64]) -> float:
    return float(values.mean()) if len(values) else 0.0


def predict_probabilities(
    predict: Predict, images: ImageSet, spec: PreprocessSpec, batch_size: int = 256
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """True labels and predicted probabilities of every image, fed through the shared
    preprocessing."""
    probabilities: list[npt.NDArray[np.float32]] = []
    labels: list[npt.NDArray[np.int64]] = []
    for x, y in batches(images, spec, batch_size).as_numpy_iterator():
        probabilities.append(np.asarray(predict(x), dtype=np.float32))
        labels.append(y.astype(np.int64))
    return np.concatenate(labels), np.concatenate(probabilities)


def predict_all(
    predict: Predict, images: ImageSet, spec: PreprocessSpec, batch_size: int = 256
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Predicted and true labels of every image, fed through the shared preprocessing."""
    labels, probabilities = predict_probabilities(predict, images, spec, batch_size)
    return labels, np.argmax(probabilities, axis=1).astype(np.int64)


def litert_predict(content: bytes, threads: int = 1) -> Predict:
    """A predict function over a LiteRT flatbuffer (the embedded runtime's path)."""
    from ai_edge_litert.interpreter import Interpreter

    runners: dict[int, Any] = {}

    def predict(x: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        runner = runners.get(len(x))
        if runner is None:
            interpreter = Interpreter(model_content=content, num_threads=threads)
            runner = runners[len(x)] = interpreter.get_signature_runner(SERVING_SIGNATURE)
        return np.asarray(runner(image=x)["probabilities"], dtype=np.float32)

    return predict


def evaluate_predictions(
    predict: Predict, images: ImageSet, spec: PreprocessSpec
) -> tuple[dict[str, Any], npt.NDArray[np.float32]]:
    """The full report (with mAP) of ``predict`` on ``images``, and its probabilities."""
    labels, probabilities = predict_probabilities(predict, images, spec)
    predicted = np.argmax(probabilities, axis=1).astype(np.int64)
    report = classification_report(labels, predicted, images.class_names, probabilities)
    return report, probabilities


def latency(predict: Predict, spec: PreprocessSpec, runs: int, batch: int = 32) -> dict[str, Any]:
    """Wall-clock latency of the signature at batch 1 and at ``batch``, after warm-up."""
    return paired_latency([predict], spec, runs, batch)[0]


def paired_latency(
    predicts: list[Predict], spec: PreprocessSpec, runs: int, batch: int = 32
) -> list[dict[str, Any]]:
    """Latency of several predict functions at batch 1 and ``batch``, timed in alternating
    rounds (one call of each per round, after a warm-up call) so that load from other
    processes on a shared machine hits them alike and their ratio stays meaningful."""
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = [{"runs": runs} for _ in predicts]
    for size in (1, batch):
        x = rng.integers(0, 256, (size, spec.height, spec.width, 3), dtype=np.uint8)
        times: list[list[float]] = [[] for _ in predicts]
        for predict in predicts:
            predict(x)
        for _ in range(max(1, runs)):
            for i, predict in enumerate(predicts):
                started = time.perf_counter()
                predict(x)
                times[i].append(time.perf_counter() - started)
        for result, measured in zip(results, times, strict=True):
            ms = np.array(measured) * 1e3
            result[f"batch_{size}"] = {
                "p50_ms": float(np.percentile(ms, 50)),
                "p95_ms": float(np.percentile(ms, 95)),
                "per_image_ms": float(np.median(ms) / size),
            }
    return results


def plot_confusion(report: dict[str, Any], path: Path, title: str) -> None:
    matrix = np.array(report["confusion_matrix"]["rows_true_cols_predicted"])
    names = report["confusion_matrix"]["labels"]
    fig = Figure(figsize=(1.0 + 0.75 * len(names), 0.8 + 0.7 * len(names)))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}  (accuracy {report['accuracy']:.2%})")
    threshold = matrix.max() / 2
    for (i, j), value in np.ndenumerate(matrix):
        color = "white" if value > threshold else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_curves(history: dict[str, list[float]], path: Path, title: str) -> None:
    fig = Figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for key, ax in (("loss", loss_ax), ("accuracy", acc_ax)):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + key)
            if values:
                epochs = range(1, len(values) + 1)
                ax.plot(epochs, values, style, label=f"{'validation' if prefix else 'train'}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def load_signature(version_dir: Path) -> Predict:
    """The SavedModel's serving signature as a function; ModelLoadError (one line) when
    TensorFlow cannot load it: a damaged variables shard printed TensorFlow's traceback
    (IndexError "Read less bytes than requested", DataLossError "Checksum does not
    match") from `cnnserve evaluate` (an outside audit, 12-07)."""
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(version_dir))
    except MemoryError:
        raise
    except Exception as exc:  # TensorFlow's own errors, and what its readers raise
        words = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelLoadError(
            f"{version_dir}: TensorFlow cannot load the SavedModel ({type(exc).__name__}: "
            f"{words}); its files are damaged or incomplete: publish the version again"
        ) from None
    if SERVING_SIGNATURE not in loaded.signatures:
        raise ModelLoadError(
            f"{version_dir}: the SavedModel has no {SERVING_SIGNATURE!r} signature "
            f"(it has {sorted(loaded.signatures) or 'none'}); re-export it with one"
        )
    fn = loaded.signatures[SERVING_SIGNATURE]

    def predict(x: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        return np.asarray(fn(**{INPUT_NAME: tf.constant(x)})[OUTPUT_NAME].numpy(), dtype=np.float32)

    predict.loaded = loaded  # type: ignore[attr-defined]  # keep the SavedModel alive
    return predict


def card_splits(card: dict[str, Any], data_dir: Path | None) -> Splits:
    """The splits a version was trained and tested on, as its card's training section
    records them. ``data_dir`` overrides the recorded dataset folder: Fashion-MNIST's IDX
    folder, or the folder of a version trained on one folder (cards record the path as
    given, relative paths included before they were made absolute)."""
    training = card["training"]
    optional = {k: Path(training[k]) for k in ("class_map", "relabel") if training.get(k)}
    datasets = [training["dataset"], *training.get("extra_datasets", [])]
    if data_dir is not None and datasets != ["fashion_mnist"]:
        if len(datasets) > 1:
            raise DatasetError(
                "--data-dir replaces one dataset folder; this version merged "
                f"{len(datasets)} sources ({', '.join(datasets)}): run from where their "
                "paths hold"
            )
        datasets = [str(data_dir)]
    try:
        return load_splits(
            datasets,
            data_dir=data_dir or Path(training["data_dir"]),
            **optional,
            val_fraction=training["val_fraction"],
            test_fraction=training["test_fraction"],
            seed=training["seed"],
        )
    except DatasetError as exc:
        if data_dir is not None or "does not exist" not in exc.message:
            raise
        raise DatasetError(
            f"{exc.message}: that is where the model card says this version's data was; "
            "give --data-dir where it is now"
        ) from None


def class_mismatch(model: list[str], data: list[str]) -> str:
    """What keeps ``data``'s class ids from meaning ``model``'s ("" when nothing): a class
    id is the class's place in the list, so a folder more, less or renamed shifts the ids
    after it (scored against the wrong outputs, or past the last one)."""
    if model == data:
        return ""

    def names(classes: list[str]) -> str:
        return ", ".join(repr(c) for c in classes)

    missing = [c for c in model if c not in data]
    extra = [c for c in data if c not in model]
    if not missing and not extra:
        return f"the same classes in another order ({names(data)}; the model's: {names(model)})"
    told = []
    if missing:
        told.append(f"missing {names(missing)}")
    if extra:
        told.append(f"extra {names(extra)}")
    return "; ".join(told)


def served_predict(version_dir: Path, card: dict[str, Any]) -> tuple[Predict, str]:
    """What the embedded gateway serves a version with: its quantized LiteRT artifact
    when it ships one (an int8 version keeps its source's float SavedModel beside it:
    that was scored, the source's figures reported as the int8 version's), else the
    SavedModel's serving signature (a float artifact answers as it does, verified at
    export)."""
    from service.runtimes.card import FLOAT_PRECISION, artifact_precision, verified_litert

    precision = artifact_precision(card)
    try:
        if precision == FLOAT_PRECISION:
            return load_signature(version_dir), "tensorflow"
        path = verified_litert(version_dir, card)
    except ModelLoadError as exc:  # the gateway refuses it: say so, score nothing
        raise DatasetError(exc.message) from None
    assert path is not None  # a quantized record always names its file
    log.info("scoring %s's %s LiteRT artifact (what the gateway serves)", version_dir, precision)
    return litert_predict(path.read_bytes()), f"litert {precision}"


def evaluate_version(
    version_dir: Path, *, data_dir: Path | None, output: Path | None, latency_runs: int
) -> dict[str, Any]:
    """Re-evaluate a published version on the test split its card records."""
    try:
        card = load_card(version_dir)
    except ModelLoadError as exc:  # the user's file to fix, not a failed load: exit 2
        raise DatasetError(exc.message) from None
    lacking = [k for k in ("preprocessing", "training") if not isinstance(card.get(k), dict)]
    if lacking:
        raise DatasetError(
            f"{version_dir}: its model card has no {' or '.join(lacking)} section (a "
            "version `cnnserve train` exported has both): evaluate re-runs what it records"
        )
    try:
        spec = PreprocessSpec.from_card(card["preprocessing"])
        splits = card_splits(card, data_dir)
    except (KeyError, TypeError, ValueError) as exc:  # a card edited by hand
        raise DatasetError(
            f"{version_dir}: its model card's preprocessing or training section is not "
            f"as cnnserve writes it ({type(exc).__name__}: {exc})"
        ) from None
    labels = card.get("labels")  # every card export writes has them
    problem = class_mismatch(labels, splits.test.class_names) if labels is not None else ""
    if problem:
        raise DatasetError(
            f"the test data's classes differ from {version_dir}'s (its card's labels): "
            f"{problem}; give --data-dir a folder of exactly the classes it was trained on"
        )
    predict, runtime = served_predict(version_dir, card)
    report, _ = evaluate_predictions(predict, splits.test, spec)
    report["runtime"] = runtime  # what was scored and timed
    report["test_split_sha256"] = splits.test.fingerprint()
    report["test_split_matches_card"] = report["test_split_sha256"] == card.get("dataset", {}).get(
        "test_sha256"
    )
    if not report["test_split_matches_card"]:
        log.warning(
            "the test split differs from the one %s was evaluated on at export (images "
            "added, removed or relabelled since): these figures are not the card's",
            version_dir,
        )
    report["latency"] = latency(predict, spec, latency_runs)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "report.json").write_text(json.dumps(report, indent=2))
        plot_confusion(report, output / "confusion_matrix.png", version_dir.as_posix())
    return report
