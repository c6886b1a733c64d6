"""tf.data input pipelines: source images → shared preprocessing → (augmentation) → batches.

Preprocessing runs per batch through :mod:`service.preprocessing` (the function the
gateway uses), and augmentation runs on the fly on those uint8 batches with Keras
preprocessing layers, so nothing is materialised at 224×224 beyond a few batches.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from service.preprocessing import PreprocessSpec, preprocess_array
from service.training.config import AugmentConfig
from service.training.data import ImageSet


def augment_layers(cfg: AugmentConfig, seed: int) -> keras.Sequential | None:
    """The Keras layers that apply ``cfg`` (None when it augments nothing)."""
    if not cfg.enabled:
        return None
    stack: list[keras.layers.Layer] = []
    if cfg.horizontal_flip:
        stack.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if cfg.rotation_degrees:
        stack.append(
            keras.layers.RandomRotation(
                cfg.rotation_degrees / 360, fill_mode=cfg.fill_mode, seed=seed + 1
            )
        )
    if cfg.width_shift or cfg.height_shift:
        stack.append(
            keras.layers.RandomTranslation(
                cfg.height_shift, cfg.width_shift, fill_mode=cfg.fill_mode, seed=seed + 2
            )
        )
    if cfg.zoom:
        stack.append(keras.layers.RandomZoom(cfg.zoom, fill_mode=cfg.fill_mode, seed=seed + 3))
    return keras.Sequential(stack, name="augment") if stack else None


def batches(
    images: ImageSet,
    spec: PreprocessSpec,
    batch_size: int,
    *,
    indices: npt.NDArray[np.int64] | None = None,
    shuffle_seed: int | None = None,
    augment: keras.Sequential | None = None,
) -> tf.data.Dataset:
    """Batches of (uint8 [B,H,W,3], int64 [B]) in model-input form."""
    order = np.arange(len(images), dtype=np.int64) if indices is None else indices

    def load(batch_indices: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.uint8], Any]:
        pixels = np.stack([images.model_input(int(i), spec) for i in batch_indices])
        return pixels, images.labels[batch_indices]

    def augmented(x: tf.Tensor) -> tf.Tensor:
        assert augment is not None
        out = augment(tf.cast(x, tf.float32), training=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

    ds = tf.data.Dataset.from_tensor_slices(order)
    if shuffle_seed is not None:
        ds = ds.shuffle(len(order), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    shape = (None, spec.height, spec.width, 3)
    if images.pixels is not None and augment is not None:
        # Same-size sources (Fashion-MNIST): augment at source resolution, *then* apply
        # the serving preprocessing, so every training input is exactly what the gateway
        # would make of some image (and costs 1/64 of augmenting at 224×224).
        pixels = images.pixels if images.pixels.ndim == 4 else images.pixels[..., None]

        def source(b: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return augmented(tf.gather(pixels, b)), tf.gather(images.labels, b)

        def finish(src: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
            return np.stack([preprocess_array(img, spec) for img in src])

        ds = ds.map(source, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(
            lambda x, y: (tf.numpy_function(finish, [x], tf.uint8, stateful=False), y),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        ds = ds.map(lambda x, y: (tf.ensure_shape(x, shape), y))
        return ds.prefetch(tf.data.AUTOTUNE)
    ds = ds.map(
        lambda b: tf.numpy_function(load, [b], (tf.uint8, tf.int64), stateful=False),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = ds.map(lambda x, y: (tf.ensure_shape(x, shape), tf.ensure_shape(y, (None,))))
    if augment is not None:
        # Sources of mixed sizes: augment the preprocessed 224×224 batch.
        ds = ds.map(lambda x, y: (augmented(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
