"""Likely label errors: out-of-fold probabilities from a cheap CNN, then confident learning.

Confident learning (Northcutt, Jiang & Chuang, "Confident Learning: Estimating Uncertainty
in Dataset Labels", JAIR 2021) is written here against the paper in numpy rather than
taken from cleanlab, whose install brings scikit-learn and pandas into a serving
product for about sixty lines of arithmetic. The steps, with the paper's names:

1. per-class thresholds ``t_j``: the mean predicted probability of class j over the
   examples labelled j;
2. the confident joint ``C[i, j]``: examples labelled i whose probability of j reaches
   ``t_j`` (the largest such j when several do);
3. calibrate ``C`` so each row sums to the number of examples labelled i, and normalise
   it into the joint ``Q[i, j]`` of given label i and true label j;
4. prune by noise rate: for every off-diagonal (i, j), flag the ``n · Q[i, j]`` examples
   labelled i with the largest margin ``p_j − p_i``; examples the model predicts as
   their given label are never flagged (as cleanlab does).

Suspects are ranked by self-confidence (the probability of the given label, lowest
first), and ``trace(Q)`` estimates the fraction of correct labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Progress = Callable[[str], None]
Probs = npt.NDArray[np.float32]


@dataclass
class LabelIssues:
    indices: npt.NDArray[np.int64]  # flagged examples, most suspicious first
    scores: npt.NDArray[np.float64]  # self-confidence of each flagged example
    suggested: npt.NDArray[np.int64]  # the model's class for each flagged example
    joint: npt.NDArray[np.float64]  # Q: rows given label, columns estimated true label

    @property
    def estimated_accuracy(self) -> float:
        return float(np.trace(self.joint))


def confident_joint(labels: npt.NDArray[np.int64], probs: Probs) -> npt.NDArray[np.float64]:
    """Steps 1–3: the calibrated, normalised joint Q of given and true labels."""
    k = probs.shape[1]
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    thresholds = np.array(
        [probs[labels == j, j].mean() if counts[j] else 1.0 for j in range(k)], dtype=np.float64
    )
    above = probs >= thresholds - 1e-6
    masked = np.where(above, probs, -1.0)
    confident = above.any(axis=1)
    true_guess = masked.argmax(axis=1)
    c = np.zeros((k, k), dtype=np.float64)
    np.add.at(c, (labels[confident], true_guess[confident]), 1)
    row = c.sum(axis=1, keepdims=True)
    calibrated = np.divide(c, row, out=np.zeros_like(c), where=row > 0) * counts[:, None]
    # A class nobody was confidently assigned to keeps its examples on the diagonal.
    for i in np.flatnonzero(row[:, 0] == 0):
        calibrated[i, i] = counts[i]
    return np.asarray(calibrated / max(float(calibrated.sum()), 1.0), np.float64)


def find_label_issues(labels: npt.NDArray[np.int64], probs: Probs) -> LabelIssues:
    """Step 4 and the ranking (see the module docstring)."""
    n, k = probs.shape
    joint = confident_joint(labels, probs)
    flagged = np.zeros(n, dtype=bool)
    for i in range(k):
        members = np.flatnonzero(labels == i)
        for j in range(k):
            prune = round(n * joint[i, j]) if j != i else 0
            if prune <= 0 or len(members) == 0:
                continue
            margin = probs[members, j] - probs[members, i]
            flagged[members[np.argsort(-margin)[:prune]]] = True
    predicted = probs.argmax(axis=1)
    flagged &= predicted != labels
    indices = np.flatnonzero(flagged)
    scores = probs[indices, labels[indices]].astype(np.float64)
    order = np.argsort(scores, kind="stable")
    return LabelIssues(
        indices=indices[order].astype(np.int64),
        scores=scores[order],
        suggested=predicted[indices[order]].astype(np.int64),
        joint=joint,
    )


def out_of_fold_probs(
    pixels: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.int64],
    num_classes: int,
    *,
    folds: int,
    epochs: int,
    seed: int,
    progress: Progress,
    batch_size: int = 128,
) -> Probs:
    """Each image's class probabilities from a small CNN that never saw it (k-fold)."""
    import keras

    keras.utils.set_random_seed(seed)
    x = pixels.astype(np.float32) / 255.0
    if x.ndim == 3:
        x = x[..., None]
    order = np.random.default_rng(seed).permutation(len(labels))
    probs = np.zeros((len(labels), num_classes), dtype=np.float32)
    for fold, held in enumerate(np.array_split(order, folds)):
        fit_on = np.setdiff1d(order, held)
        model = _small_cnn(x.shape[1:], num_classes)

        class Report(keras.callbacks.Callback):  # type: ignore[misc]
            def __init__(self, fold: int) -> None:
                super().__init__()
                self.fold = fold

            def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
                acc = (logs or {}).get("accuracy", float("nan"))
                progress(f"fold {self.fold}/{folds} epoch {epoch + 1}/{epochs} accuracy {acc:.3f}")

        model.fit(
            x[fit_on],
            labels[fit_on],
            batch_size=batch_size,
            epochs=epochs,
            verbose=0,
            callbacks=[Report(fold + 1)],
        )
        # Called directly (not predict): a fresh model per fold would retrace predict's
        # tf.function each time, and TensorFlow warns about that.
        for start in range(0, len(held), 1024):
            part = held[start : start + 1024]
            probs[part] = keras.ops.convert_to_numpy(model(x[part], training=False))
    return probs


def _small_cnn(shape: tuple[int, ...], num_classes: int) -> Any:
    import keras
    from keras import layers

    model = keras.Sequential(
        [
            keras.Input(shape),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dropout(0.3),
            layers.Dense(128, activation="relu"),
            layers.Dense(num_classes, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
