"""LeNet-5 and AlexNet: their classic layouts at our 224×224 uint8 input, and trainable."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from service.preprocessing import PreprocessSpec
from service.training.architectures import build
from service.training.config import ArchConfig, AugmentConfig
from service.training.data import ImageSet
from service.training.pipeline import augment_layers, batches
from service.training.radam import RAdam

pytestmark = pytest.mark.slow


def test_lenet5_keeps_the_classic_layout() -> None:
    model = build(ArchConfig(name="lenet5", num_classes=10, dropout=0.0))
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [(c.filters, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    dense = [layer.units for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert dense == [120, 84, 10]
    # 224 / 8 = 28, LeNet's effective input: C1 keeps 28, S2 14, C3 10, S4 5 → 400 features.
    assert model.get_layer("flatten").output.shape[-1] == 5 * 5 * 16
    assert model.input.dtype == "uint8" and model.output.shape[-1] == 10


def test_alexnet_has_its_stem_and_batchnorm_instead_of_lrn() -> None:
    model = build(ArchConfig(name="alexnet", num_classes=10))
    conv1 = model.get_layer("conv1")
    assert conv1.kernel_size == (11, 11) and conv1.strides == (4, 4) and conv1.filters == 96
    assert [model.get_layer(f"conv{i}").filters for i in range(1, 6)] == [96, 256, 384, 384, 256]
    assert {"conv1_bn", "conv2_bn"} <= {layer.name for layer in model.layers}
    assert model.get_layer("pool5").output.shape[1:] == (6, 6, 256)


@pytest.mark.parametrize("name,width", [("lenet5", 1.0), ("alexnet", 0.25)])
def test_fits_a_few_steps_with_the_training_pipeline(name: str, width: float) -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = ImageSet(
        "train",
        ["a", "b"],
        np.array([0, 1] * 8, dtype=np.int64),
        pixels=rng.integers(0, 256, (16, 28, 28), dtype=np.uint8),
    )
    data = batches(
        images, PreprocessSpec(), 8, shuffle_seed=0, augment=augment_layers(AugmentConfig(), 0)
    )
    model = build(ArchConfig(name=name, num_classes=2, width_multiplier=width))
    model.compile(optimizer=RAdam(1e-3), loss="sparse_categorical_crossentropy")
    before = [np.array(w) for w in model.get_weights()]
    history = model.fit(data, epochs=2, verbose=0, shuffle=False).history["loss"]
    assert len(history) == 2 and all(np.isfinite(history))
    changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True)]
    assert sum(changed) >= len(changed) // 2
