"""What an interrupted fit needs back besides its weights.

Keras' BackupAndRestore saves the weights, the optimizer (learning rate included) and
the epoch reached; a resumed ``fit`` then starts a new History and every callback starts
from scratch. Without more, a run interrupted at epoch 7 of 12 published a card whose
curves began at epoch 8, early stopping forgot its best loss (and the weights to go back
to), the plateau schedule its patience, and the overfitting watch its warnings.

:class:`FitJournal` keeps, per finished epoch, the logs and those callbacks' state, in
the backup folder (which Keras deletes once the fit ends), and puts them back when the
fit resumes. It runs after BackupAndRestore at each epoch's end, so the journal is never
ahead of the weights; a crash between the two loses at most that epoch's line, said so.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

log = logging.getLogger(__name__)

JOURNAL = "journal.json"
BEST_WEIGHTS = "best-weights.npz"


def _write_atomically(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class FitJournal(keras.callbacks.Callback):  # type: ignore[misc]
    """Epoch logs plus the state of ``early``, ``plateau`` and ``watch``, kept in
    ``folder`` and restored on the first epoch of a resumed fit."""

    def __init__(
        self,
        folder: Path,
        *,
        early: keras.callbacks.EarlyStopping,
        plateau: keras.callbacks.ReduceLROnPlateau | None,
        watch: Any,
    ) -> None:
        super().__init__()
        self.folder = folder
        self.early, self.plateau, self.watch = early, plateau, watch
        self.entries: list[dict[str, Any]] = []
        self._restored = False
        self._started = time.monotonic()
        self._seconds_before = 0.0

    # --- the record ------------------------------------------------------------------

    def history(self) -> dict[str, list[float]]:
        """Every epoch's logs, those before an interruption included."""
        keys = list(dict.fromkeys(k for entry in self.entries for k in entry["logs"]))
        return {k: [float(e["logs"][k]) for e in self.entries if k in e["logs"]] for k in keys}

    def seconds(self) -> float:
        """Fit time over all attempts (the time between them not counted)."""
        return self._seconds_before + time.monotonic() - self._started

    # --- Keras hooks -----------------------------------------------------------------

    def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        # The first epoch says where BackupAndRestore resumed (0 when it did not).
        if not self._restored:
            self._restored = True
            self._restore(epoch)

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        early = self.early
        # A new best: the weights early stopping goes back to at the end.
        if (
            early.restore_best_weights
            and early.best_weights is not None
            and early.best_epoch == epoch
        ):
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomically(self.folder / BEST_WEIGHTS, _saver(early.best_weights))
        logs = {k: float(v) for k, v in (logs or {}).items()}
        if "learning_rate" not in logs and self.model is not None:
            # Only the plateau schedule's callback logs it; a cosine run's card had none.
            rate = self.model.optimizer.learning_rate
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(rate))
        self.entries.append(
            {
                "epoch": epoch,
                "logs": logs,
                "seconds": self.seconds(),
                "early_stopping": {
                    "wait": early.wait,
                    "best": _number(early.best),
                    "best_epoch": early.best_epoch,
                },
                "plateau": None
                if self.plateau is None
                else {
                    "wait": self.plateau.wait,
                    "best": _number(self.plateau.best),
                    "cooldown_counter": self.plateau.cooldown_counter,
                },
                "overfit_watch": {
                    "gaps": list(self.watch.gaps),
                    "warnings": list(self.watch.warnings),
                },
            }
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(
            self.folder / JOURNAL, lambda p: p.write_text(json.dumps({"epochs": self.entries}))
        )

    # --- resuming --------------------------------------------------------------------

    def _restore(self, resumed_at: int) -> None:
        path = self.folder / JOURNAL
        if resumed_at == 0 or not path.exists():
            if resumed_at:
                log.warning(
                    "resuming at epoch %d without a record of the epochs before it: the "
                    "card's curves start there and early stopping starts afresh",
                    resumed_at + 1,
                )
            return
        saved = json.loads(path.read_text())["epochs"][:resumed_at]
        if len(saved) < resumed_at:
            log.warning(
                "the record of epoch(s) %d-%d was lost with the interruption; their curves "
                "are missing from the card",
                len(saved) + 1,
                resumed_at,
            )
        self.entries = saved
        if not saved:
            return
        last = saved[-1]
        self._seconds_before = float(last["seconds"])
        state = last["early_stopping"]
        self.early.wait, self.early.best = state["wait"], state["best"]
        self.early.best_epoch = state["best_epoch"]
        best = self.folder / BEST_WEIGHTS
        if self.early.restore_best_weights and best.exists():
            with np.load(best) as arrays:
                self.early.best_weights = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
        if self.plateau is not None and last["plateau"] is not None:
            state = last["plateau"]
            self.plateau.wait, self.plateau.best = state["wait"], state["best"]
            self.plateau.cooldown_counter = state["cooldown_counter"]
        self.watch.gaps = list(last["overfit_watch"]["gaps"])
        self.watch.warnings = list(last["overfit_watch"]["warnings"])
        log.info(
            "resumed at epoch %d with the record of the %d before it", resumed_at + 1, len(saved)
        )


def _saver(arrays: list[Any]) -> Any:
    def save(path: Path) -> None:
        with path.open("wb") as fh:  # a file, so numpy adds no ".npz" to the name
            np.savez(fh, *arrays)

    return save


def _number(value: Any) -> float | None:
    return None if value is None else float(value)
