"""CNN architectures. Every model takes uint8 [N, 224, 224, 3] RGB and returns softmax
probabilities; normalization is the first layer of the graph, so the gateway sends one
byte per pixel and serving can never normalize differently from training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import layers, regularizers

from service.contract import INPUT_NAME, OUTPUT_NAME
from service.training.config import ArchConfig

# x / 127.5 - 1 maps [0, 255] to [-1, 1]; recorded in the model card.
NORMALIZATION = {"scale": 1 / 127.5, "offset": -1.0, "formula": "x / 127.5 - 1"}


def _inputs(cfg: ArchConfig) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    image = keras.Input(shape=(cfg.height, cfg.width, 3), dtype="uint8", name=INPUT_NAME)
    # Rescaling casts the uint8 input to float32 itself.
    x = layers.Rescaling(NORMALIZATION["scale"], offset=NORMALIZATION["offset"], name="normalize")(
        image
    )
    return image, x


def _width(cfg: ArchConfig, channels: int) -> int:
    return max(8, round(channels * cfg.width_multiplier / 8) * 8)


def _l2(cfg: ArchConfig) -> regularizers.Regularizer | None:
    return regularizers.L2(cfg.weight_decay) if cfg.weight_decay > 0 else None


def _classifier(x: keras.KerasTensor, cfg: ArchConfig) -> keras.KerasTensor:
    """Dropout (when configured) and the softmax layer every architecture ends with."""
    if cfg.dropout > 0:
        x = layers.Dropout(cfg.dropout, name="dropout")(x)
    return layers.Dense(
        cfg.num_classes, activation="softmax", kernel_regularizer=_l2(cfg), name=OUTPUT_NAME
    )(x)


def _head(x: keras.KerasTensor, cfg: ArchConfig) -> keras.KerasTensor:
    return _classifier(layers.GlobalAveragePooling2D(name="pool")(x), cfg)


def seed_cnn(cfg: ArchConfig) -> keras.Model:
    """The seed article's network, exactly: two conv/pool stages and two dense layers
    (L2 on the dense layers). At 224×224 its Flatten has 186,624 features, so it is
    large (~24M parameters) and slow; kept as the baseline the article describes."""
    image, x = _inputs(cfg)
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="relu", kernel_regularizer=_l2(cfg), name="dense")(x)
    out = _classifier(x, cfg)
    return keras.Model(image, out, name="seed_cnn")


def _conv_bn(x: Any, channels: int, kernel: int, stride: int, name: str, act: bool = True) -> Any:
    x = layers.Conv2D(channels, kernel, strides=stride, padding="same", use_bias=False, name=name)(
        x
    )
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if act else x


def _squeeze_excite(x: Any, channels: int, name: str) -> Any:
    s = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_se_pool")(x)
    s = layers.Conv2D(max(8, channels // 4), 1, activation="relu", name=f"{name}_se_reduce")(s)
    s = layers.Conv2D(channels, 1, activation="sigmoid", name=f"{name}_se_expand")(s)
    return layers.Multiply(name=f"{name}_se_scale")([x, s])


def resnet(cfg: ArchConfig) -> keras.Model:
    """A small ResNet: BatchNorm, basic residual blocks, optional squeeze-and-excitation.
    The stem averages 4×4 pixels then strides by 2, so the residual stages run at 28, 14
    and 7 pixels instead of 112, 56 and 28."""
    image, x = _inputs(cfg)
    x = layers.AveragePooling2D(4, name="stem_pool")(x)
    x = _conv_bn(x, _width(cfg, 32), 3, 2, "stem")
    for stage, channels in enumerate((32, 64, 128)):
        channels = _width(cfg, channels)
        for block in range(cfg.depth):
            name = f"s{stage}b{block}"
            stride = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = _conv_bn(x, channels, 3, stride, f"{name}_c1")
            y = _conv_bn(y, channels, 3, 1, f"{name}_c2", act=False)
            if cfg.squeeze_excite:
                y = _squeeze_excite(y, channels, name)
            if stride != 1 or shortcut.shape[-1] != channels:
                shortcut = _conv_bn(shortcut, channels, 1, stride, f"{name}_proj", act=False)
            x = layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))
    return keras.Model(image, _head(x, cfg), name="resnet")


def _separable(x: Any, channels: int, stride: int, name: str) -> Any:
    x = layers.DepthwiseConv2D(
        3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw"
    )(x)
    x = layers.BatchNormalization(name=f"{name}_dw_bn")(x)
    x = layers.ReLU(name=f"{name}_dw_relu")(x)
    return _conv_bn(x, channels, 1, 1, f"{name}_pw")


def efficient_cnn(cfg: ArchConfig) -> keras.Model:
    """The default: built for fast CPU serving at 224×224.

    A parameter-free 4×4 average pool and one strided conv take 224 pixels to 28 in
    two layers (cheap, anti-aliased early downsampling); full 3×3 convs then learn
    the fine structure at 28×28 where it is cheap, and depthwise-separable blocks do
    the rest at 14 and 7. About 50 MFLOPs (25M multiply-adds) per image at width 1.0,
    most of it in the 28×28 convs where Fashion-MNIST-sized detail lives.
    """
    image, x = _inputs(cfg)
    x = layers.AveragePooling2D(4, name="stem_pool")(x)
    x = _conv_bn(x, _width(cfg, 32), 3, 2, "stem")
    for block in range(cfg.depth):
        x = _conv_bn(x, _width(cfg, 32), 3, 1, f"s0b{block}")
    for stage, channels in enumerate((96, 192), start=1):
        for block in range(cfg.depth):
            name = f"s{stage}b{block}"
            stride = 2 if block == 0 else 1
            y = _separable(x, _width(cfg, channels), stride, name)
            if cfg.squeeze_excite:
                y = _squeeze_excite(y, _width(cfg, channels), name)
            x = y if block == 0 else layers.Add(name=f"{name}_add")([x, y])
    x = _conv_bn(x, _width(cfg, 384), 1, 1, "head_conv")
    return keras.Model(image, _head(x, cfg), name="efficient_cnn")


def lenet5(cfg: ArchConfig) -> keras.Model:
    """LeNet-5 (LeCun et al. 1998) adapted to 224×224 RGB: a parameter-free 8×8 average
    pool brings the input to 28×28 (LeNet's 32×32 input padded MNIST's 28×28 to the same
    effect, so conv1 uses ``same`` padding), then the original layout: 5×5 conv 6 → 2×2
    average pool → 5×5 conv 16 → 2×2 average pool → Dense 120 → Dense 84 → classes, tanh
    as in the paper. The C3 partial connection table and the RBF output are replaced by a
    full convolution and softmax, as every modern reimplementation does."""
    image, x = _inputs(cfg)
    x = layers.AveragePooling2D(8, name="stem_pool")(x)

    def channels(n: int) -> int:  # LeNet's own sizes (6, 16), not rounded to multiples of 8
        return max(1, round(n * cfg.width_multiplier))

    x = layers.Conv2D(channels(6), 5, padding="same", activation="tanh", name="c1")(x)
    x = layers.AveragePooling2D(2, name="s2")(x)
    x = layers.Conv2D(channels(16), 5, activation="tanh", name="c3")(x)
    x = layers.AveragePooling2D(2, name="s4")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(120, activation="tanh", kernel_regularizer=_l2(cfg), name="c5")(x)
    x = layers.Dense(84, activation="tanh", kernel_regularizer=_l2(cfg), name="f6")(x)
    out = _classifier(x, cfg)
    return keras.Model(image, out, name="lenet5")


def alexnet(cfg: ArchConfig) -> keras.Model:
    """AlexNet (Krizhevsky et al. 2012) at 224×224: the 11×11 stride-4 stem, 3×3/2 max
    pools, 5×5 then three 3×3 convs, two dropout-regularised dense layers. Adapted: the
    stem uses ``same`` padding (224 → 56), local response normalisation is replaced by
    BatchNorm after conv1 and conv2, and the dense layers are 1024 wide instead of 4096
    (Fashion-MNIST has 10 classes, not 1,000). ``--width`` scales every layer."""
    image, x = _inputs(cfg)
    x = layers.Conv2D(_width(cfg, 96), 11, strides=4, padding="same", name="conv1")(x)
    x = layers.ReLU(name="conv1_relu")(layers.BatchNormalization(name="conv1_bn")(x))
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    x = layers.Conv2D(_width(cfg, 256), 5, padding="same", name="conv2")(x)
    x = layers.ReLU(name="conv2_relu")(layers.BatchNormalization(name="conv2_bn")(x))
    x = layers.MaxPooling2D(3, strides=2, name="pool2")(x)
    for i, channels in enumerate((384, 384, 256), start=3):
        x = layers.Conv2D(
            _width(cfg, channels), 3, padding="same", activation="relu", name=f"conv{i}"
        )(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool5")(x)
    x = layers.Flatten(name="flatten")(x)
    for i in (6, 7):
        x = layers.Dense(
            _width(cfg, 1024), activation="relu", kernel_regularizer=_l2(cfg), name=f"fc{i}"
        )(x)
        if cfg.dropout > 0:
            x = layers.Dropout(cfg.dropout, name=f"fc{i}_dropout")(x)
    out = layers.Dense(
        cfg.num_classes, activation="softmax", kernel_regularizer=_l2(cfg), name="probabilities"
    )(x)
    return keras.Model(image, out, name="alexnet")


ARCHITECTURES: dict[str, Callable[[ArchConfig], keras.Model]] = {
    "efficient_cnn": efficient_cnn,
    "resnet": resnet,
    "seed_cnn": seed_cnn,
    "lenet5": lenet5,
    "alexnet": alexnet,
}


def build(cfg: ArchConfig) -> keras.Model:
    try:
        factory = ARCHITECTURES[cfg.name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {cfg.name!r}; one of {sorted(ARCHITECTURES)}"
        ) from None
    return factory(cfg)
