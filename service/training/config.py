"""What a training run is: its configuration, declared once.

Light on purpose (no TensorFlow): the CLI takes its defaults and choices from here, so
`cnnserve train --help` is fast and cannot disagree with what training does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from service.config import FASHION_MNIST_DIR
from service.preprocessing import PreprocessSpec

ARCHITECTURE_NAMES = ("efficient_cnn", "resnet", "seed_cnn", "lenet5", "alexnet")
Optimizer = Literal["sgd", "adam", "adamw", "radam"]
Schedule = Literal["plateau", "cosine", "constant"]
# "balanced" weighs each class's loss by n_images / (n_classes * n_class_images).
ClassWeight = Literal["none", "balanced"]


# The seed article's network comes with its own regularization (no dropout, L2 0.01 on
# the dense layers); the others default to dropout 0.2 and no L2.
SEED_CNN = "seed_cnn"
SEED_CNN_DROPOUT = 0.0
SEED_CNN_L2 = 0.01


@dataclass(frozen=True)
class ArchConfig:
    name: str = "efficient_cnn"
    num_classes: int = 10
    height: int = 224
    width: int = 224
    width_multiplier: float = 1.0
    depth: int = 2
    dropout: float = 0.2
    weight_decay: float = 0.0
    squeeze_excite: bool = False

    @classmethod
    def for_arch(
        cls, name: str, *, dropout: float | None = None, l2: float | None = None, **kw: Any
    ) -> ArchConfig:
        """``name``'s layout with its own regularization defaults where none is given."""
        default = cls()
        seed = name == SEED_CNN
        if dropout is None:
            dropout = SEED_CNN_DROPOUT if seed else default.dropout
        if l2 is None:
            l2 = SEED_CNN_L2 if seed else default.weight_decay
        return cls(name=name, dropout=dropout, weight_decay=l2, **kw)


@dataclass(frozen=True)
class AugmentConfig:
    """The seed article's augmentation by default; any part can be switched off (0/False)."""

    enabled: bool = True
    rotation_degrees: float = 20.0
    width_shift: float = 0.2
    height_shift: float = 0.2
    horizontal_flip: bool = True
    zoom: float = 0.2
    fill_mode: str = "constant"

    def to_card(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "fashion_mnist"
    data_dir: Path = FASHION_MNIST_DIR
    arch: ArchConfig = field(default_factory=ArchConfig)
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    epochs: int = 30
    batch_size: int = 128
    optimizer: Optimizer = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.9
    beta_1: float = 0.9
    beta_2: float = 0.999
    weight_decay: float = 1e-4  # decoupled: AdamW and RAdam (0 for SGD and Adam)
    schedule: Schedule = "plateau"
    early_stopping_patience: int = 5
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    min_learning_rate: float = 1e-6
    val_fraction: float = 0.1
    test_fraction: float = 0.1  # folder datasets only; Fashion-MNIST has its own test set
    balance: bool = False
    class_weight: ClassWeight = "none"
    # More sources merged with `dataset` (service.training.sources), a class-mapping file
    # for sources that name classes differently, and reviewed label corrections.
    extra_datasets: tuple[str, ...] = ()
    class_map: Path | None = None
    relabel: Path | None = None
    limit: int = 0  # use N training images, a stratified sample (quick runs); 0 = all
    seed: int = 0

    def __post_init__(self) -> None:
        # SGD and Adam take no decoupled decay: recorded as 0, what they apply.
        if self.optimizer in ("sgd", "adam") and self.weight_decay:
            object.__setattr__(self, "weight_decay", 0.0)

    @property
    def datasets(self) -> tuple[str, ...]:
        return (self.dataset, *self.extra_datasets)

    def as_run(self, num_classes: int) -> TrainConfig:
        """The config with the class count the data gave (the config's own is a default):
        what config.json and the model card record, so a published version and its run
        in the work directory are recognised as one."""
        return replace(self, arch=replace(self.arch, num_classes=num_classes))

    def to_card(self) -> dict[str, Any]:
        card = asdict(self)
        card["data_dir"] = str(self.data_dir)
        card["extra_datasets"] = list(self.extra_datasets)
        for key in ("class_map", "relabel"):
            card[key] = None if card[key] is None else str(card[key])
        return card

    def fingerprint(self) -> str:
        card = self.to_card()
        for key in ADDED_LATER:  # at their defaults they leave older fingerprints unchanged
            if card[key] == ADDED_LATER[key]:
                del card[key]
        if self.optimizer == "radam" and self.weight_decay:
            # RAdam applies its decay since 12-04: a finished fit from before (none
            # applied) is another run, not one to reuse under a card that says it was.
            card["radam_decay"] = "decoupled"
        if self.weight_decay:
            # Since 12-05 the decay spares biases and normalisation variables: a finished
            # fit that decayed them is another run.
            card["decay_spares"] = "1-d variables"
        return hashlib.sha256(json.dumps(card, sort_keys=True).encode()).hexdigest()[:16]


ADDED_LATER: dict[str, Any] = {
    "class_weight": "none",
    "extra_datasets": [],
    "class_map": None,
    "relabel": None,
}
