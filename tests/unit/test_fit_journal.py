"""The journal an interrupted fit resumes from: curves and callbacks' state come back."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from service.training.journal import FitJournal
from service.training.train import OverfitWatch


def _callbacks() -> tuple[
    keras.callbacks.EarlyStopping, keras.callbacks.ReduceLROnPlateau, OverfitWatch
]:
    early = keras.callbacks.EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=3)
    for callback in (early, plateau):
        callback.on_train_begin()
    return early, plateau, OverfitWatch()


def test_a_resumed_fit_gets_back_its_epochs_and_callbacks_state(tmp_path: Path) -> None:
    early, plateau, watch = _callbacks()
    first = FitJournal(tmp_path, early=early, plateau=plateau, watch=watch)
    first.on_epoch_begin(0)
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)]
    for epoch, val_loss in enumerate([0.9, 0.5, 0.7]):
        logs = {
            "loss": 1.0 - epoch / 10,
            "val_loss": val_loss,
            "accuracy": 0.5,
            "val_accuracy": 0.4,
        }
        early.wait, early.best, early.best_epoch = (
            epoch,
            min(0.9, 0.5 if epoch else 0.9),
            min(epoch, 1),
        )
        early.best_weights = [w + epoch for w in weights]
        plateau.wait, plateau.best, plateau.cooldown_counter = epoch + 1, 0.5, 2
        watch.gaps.append(0.1 * epoch)
        watch.warnings.append(f"warning {epoch}")
        first.on_epoch_end(epoch, logs)

    # The weights' backup reached epoch 2 (two finished epochs): the third line is dropped.
    early, plateau, watch = _callbacks()
    resumed = FitJournal(tmp_path, early=early, plateau=plateau, watch=watch)
    resumed.on_epoch_begin(2)
    assert resumed.history()["val_loss"] == [0.9, 0.5]
    assert (early.wait, early.best, early.best_epoch) == (1, 0.5, 1)
    assert early.best_weights is not None
    for got, want in zip(early.best_weights, weights, strict=True):
        np.testing.assert_array_equal(got, want + 1)  # epoch 1's, the best
    assert (plateau.wait, plateau.best, plateau.cooldown_counter) == (2, 0.5, 2)
    assert watch.gaps == [0.0, 0.1] and watch.warnings == ["warning 0", "warning 1"]
    assert resumed.seconds() >= first.entries[1]["seconds"]


def test_a_fresh_fit_ignores_a_journal_left_behind(tmp_path: Path) -> None:
    early, plateau, watch = _callbacks()
    left = FitJournal(tmp_path, early=early, plateau=plateau, watch=watch)
    left.on_epoch_begin(0)
    left.on_epoch_end(0, {"loss": 1.0, "val_loss": 1.0})
    early, plateau, watch = _callbacks()
    fresh = FitJournal(tmp_path, early=early, plateau=plateau, watch=watch)
    fresh.on_epoch_begin(0)
    assert fresh.history() == {} and early.best is None
