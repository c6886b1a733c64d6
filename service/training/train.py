"""The training loop: splits → pipelines → fit with callbacks → a trained Keras model.

Fit is resumable: Keras' BackupAndRestore checkpoints every epoch into the work
directory, and :mod:`service.training.journal` the curves and the callbacks' state, so
an interrupted run continues where it stopped when started again with the same
command; a finished fit is kept so a failed export need not retrain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras

from service.config_edit import write_atomically
from service.training.architectures import build
from service.training.config import TrainConfig
from service.training.data import Splits, balanced_class_weight, check_class_name, oversample
from service.training.journal import FitJournal
from service.training.pipeline import augment_layers, batches
from service.training.radam import RAdam  # also registers it for reloading checkpoints
from service.training.sources import load_splits

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: keras.Model
    splits: Splits
    history: dict[str, list[float]]
    seconds: float
    warnings: list[str]
    # The work folder's name: the recipe's and the data's hashes (the card keeps it, so a
    # rerun of a published fit is recognised).
    run_id: str = ""


class OverfitWatch(keras.callbacks.Callback):  # type: ignore[misc]
    """Warns when the curves say the model memorises instead of generalising: the seed
    article's rule (train accuracy > 95% while validation < 70%) or a train/validation
    gap that widened three epochs running and now exceeds 5 points."""

    def __init__(self) -> None:
        super().__init__()
        self.gaps: list[float] = []
        self.warnings: list[str] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        logs = logs or {}
        train, val = logs.get("accuracy"), logs.get("val_accuracy")
        if train is None or val is None:
            return
        self.gaps.append(train - val)
        message = None
        if train > 0.95 and val < 0.70:
            message = f"epoch {epoch + 1}: train accuracy {train:.1%} but validation {val:.1%}"
        elif (
            len(self.gaps) >= 4
            and all(b > a for a, b in zip(self.gaps[-4:], self.gaps[-3:], strict=False))
            and self.gaps[-1] > 0.05
        ):
            message = f"epoch {epoch + 1}: train/validation gap widened to {self.gaps[-1]:.1%}"
        if message:
            text = f"overfitting: {message}; consider more augmentation, dropout or weight decay"
            self.warnings.append(text)
            log.warning(text)


class ProgressLog(keras.callbacks.Callback):  # type: ignore[misc]
    """One line per epoch on stderr (Keras' bar is unreadable in CI logs)."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs
        self.started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        logs = logs or {}
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        parts = " ".join(f"{k}={v:.4f}" for k, v in sorted(logs.items()) if k != "learning_rate")
        elapsed = time.monotonic() - self.started
        sys.stderr.write(
            f"epoch {epoch + 1}/{self.epochs} {parts} lr={lr:.2e} elapsed={elapsed:.0f}s\n"
        )
        sys.stderr.flush()


def _optimizer(
    cfg: TrainConfig, steps_per_epoch: int, model: keras.Model | None = None
) -> keras.optimizers.Optimizer:
    """The optimizer ``cfg`` names. Its decoupled decay (AdamW, RAdam) spares the
    model's biases and normalisation scales and shifts (its 1-D variables): shrinking
    a BatchNorm gamma or a bias toward 0 regularises nothing and only fights the
    normalisation (Loshchilov & Hutter; the usual practice since)."""
    optimizer = _named_optimizer(cfg, steps_per_epoch)
    if cfg.weight_decay and model is not None:
        optimizer.exclude_from_weight_decay(
            var_list=[v for v in model.trainable_variables if len(v.shape) <= 1]
        )
    return optimizer


def _named_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    lr: float | keras.optimizers.schedules.LearningRateSchedule = cfg.learning_rate
    if cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            cfg.learning_rate,
            decay_steps=cfg.epochs * steps_per_epoch,
            alpha=cfg.min_learning_rate / cfg.learning_rate,
        )
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr, beta_1=cfg.beta_1, beta_2=cfg.beta_2)
    if cfg.optimizer == "radam":
        # Decoupled decay as AdamW's (it was left out: the card said 1e-4, none applied).
        return RAdam(
            lr, beta_1=cfg.beta_1, beta_2=cfg.beta_2, weight_decay=cfg.weight_decay or None
        )
    return keras.optimizers.AdamW(
        lr, beta_1=cfg.beta_1, beta_2=cfg.beta_2, weight_decay=cfg.weight_decay
    )


def _finished_fit(
    run_dir: Path, final_path: Path, history_path: Path, splits: Splits
) -> TrainResult | None:
    """The fit a previous run finished in ``run_dir``, or None (fit again) when its files
    cannot be read back: a damaged record must cost a refit, not the command."""
    try:
        saved = json.loads(history_path.read_text())
        history, seconds, warnings = saved["history"], float(saved["seconds"]), saved["warnings"]
        if not isinstance(history, dict) or not isinstance(warnings, list):
            raise ValueError("unexpected layout")
        model = keras.models.load_model(final_path, safe_mode=False)
    except Exception as exc:  # any damage: JSON, keys, types, a truncated .keras archive
        log.warning("cannot reuse the finished fit in %s (%s); fitting again", run_dir, exc)
        return None
    log.info("reusing finished fit in %s", run_dir)
    return TrainResult(model, splits, history, seconds, warnings, run_dir.name)


def train(cfg: TrainConfig, work_dir: Path) -> TrainResult:
    """Fit a model; resumes from ``work_dir`` when a run with this config was interrupted."""
    keras.utils.set_random_seed(cfg.seed)
    splits = load_splits(
        cfg.datasets,
        data_dir=cfg.data_dir,
        class_map=cfg.class_map,
        relabel=cfg.relabel,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
    )
    for name in splits.train.class_names:  # folders are checked as read; --class-map's too
        check_class_name(name, "the dataset's classes")
    if cfg.limit:
        splits.train = splits.train.sample(cfg.limit, cfg.seed)
    for warning in splits.thin_classes():
        log.warning("%s", warning)
    as_run = cfg.as_run(len(splits.train.class_names))
    # The run is the recipe and the data it fits: a folder whose images changed is a new
    # run (keyed by the recipe alone, a finished fit on the old images was reused and
    # published under the new data's card).
    data = hashlib.sha256(
        f"{splits.train.fingerprint()} {splits.validation.fingerprint()}".encode()
    ).hexdigest()[:8]
    run_dir = work_dir / f"{cfg.fingerprint()}-{data}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(as_run.to_card(), indent=2))  # `experiments`
    final_path, history_path = run_dir / "final.keras", run_dir / "history.json"
    if final_path.exists() and history_path.exists():
        reused = _finished_fit(run_dir, final_path, history_path, splits)
        if reused is not None:
            return reused

    indices = oversample(splits.train.labels, cfg.seed) if cfg.balance else None
    steps = math.ceil((len(indices) if indices is not None else len(splits.train)) / cfg.batch_size)
    train_ds = batches(
        splits.train,
        cfg.preprocess,
        cfg.batch_size,
        indices=indices,
        shuffle_seed=cfg.seed,
        augment=augment_layers(cfg.augment, cfg.seed),
    )
    val_ds = batches(splits.validation, cfg.preprocess, cfg.batch_size)
    model = build(as_run.arch)
    model.compile(
        optimizer=_optimizer(cfg, steps, model),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    watch = OverfitWatch()
    early = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=cfg.early_stopping_patience, restore_best_weights=True
    )
    plateau = (
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss",
            factor=cfg.plateau_factor,
            patience=cfg.plateau_patience,
            min_lr=cfg.min_learning_rate,
        )
        if cfg.schedule == "plateau"
        else None
    )
    backup = run_dir / "backup"
    journal = FitJournal(backup, early=early, plateau=plateau, watch=watch)
    # Order matters at each epoch's end: the callbacks that change state (and the
    # learning rate) first, then the weights' backup, then the journal of that state.
    callbacks: list[keras.callbacks.Callback] = [
        early,
        *([plateau] if plateau is not None else []),
        watch,
        keras.callbacks.BackupAndRestore(str(backup)),
        journal,
        ProgressLog(cfg.epochs),
    ]
    weights = balanced_class_weight(splits.train.labels) if cfg.class_weight == "balanced" else None
    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=cfg.epochs,
        callbacks=callbacks,
        verbose=0,
        class_weight=weights,
        shuffle=False,  # the pipeline shuffles; Keras warned of its ignored default each run
    )
    # The fit's own History starts at a resumed epoch; the journal holds them all.
    history, seconds = journal.history(), journal.seconds()
    model.save(final_path)
    # Last, and whole or not at all: a history.json marks the fit as finished.
    write_atomically(
        history_path,
        json.dumps({"history": history, "seconds": seconds, "warnings": watch.warnings}),
    )
    return TrainResult(model, splits, history, seconds, watch.warnings, run_dir.name)
