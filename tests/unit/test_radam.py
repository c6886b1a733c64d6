"""RAdam against the published update rule (Liu et al. 2019, Algorithm 2)."""

from __future__ import annotations

import keras
import numpy as np

from service.training.radam import RAdam


def reference_radam(
    theta: np.ndarray, grads: list[np.ndarray], lr: float, beta_1: float, beta_2: float, eps: float
) -> tuple[list[np.ndarray], list[bool]]:
    """The paper's rule in plain numpy: parameters after each step, and whether the
    rectified (adaptive) branch ran at that step."""
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    rho_inf = 2 / (1 - beta_2) - 1
    out, rectified = [], []
    for t, g in enumerate(grads, start=1):
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        m_hat = m / (1 - beta_1**t)
        rho_t = rho_inf - 2 * t * beta_2**t / (1 - beta_2**t)
        if rho_t > 4:
            r = np.sqrt(
                (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            )
            theta = theta - lr * r * m_hat / (np.sqrt(v / (1 - beta_2**t)) + eps)
            rectified.append(True)
        else:
            theta = theta - lr * m_hat
            rectified.append(False)
        out.append(theta.copy())
    return out, rectified


def test_matches_the_reference_rule_and_rectifies_only_after_enough_steps() -> None:
    rng = np.random.default_rng(0)
    start = rng.normal(size=(3, 2)).astype(np.float64)
    grads = [rng.normal(size=(3, 2)) for _ in range(12)]
    expected, rectified = reference_radam(start, grads, 0.1, 0.9, 0.999, 1e-7)
    # With beta_2 = 0.999 the variance rectification switches on at step 5.
    assert rectified == [False] * 4 + [True] * 8

    variable = keras.Variable(start.astype("float32"))
    optimizer = RAdam(learning_rate=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-7)
    for g, want in zip(grads, expected, strict=True):
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(g.astype("float32")), variable)])
        np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), want, rtol=1e-4, atol=1e-5)


def test_first_steps_are_bias_corrected_momentum_not_adam() -> None:
    # Before rectification an Adam step would be lr * sign(g) (|m_hat| / sqrt(v_hat) = 1);
    # RAdam's is lr * m_hat = lr * g at step one.
    variable = keras.Variable(np.zeros(2, "float32"))
    RAdam(learning_rate=0.5).apply_gradients([(keras.ops.convert_to_tensor([0.2, -4.0]), variable)])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), [-0.1, 2.0], rtol=1e-5)


def test_decreases_a_loss_when_training_a_model() -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], "float32") + 0.3)[:, None]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=RAdam(learning_rate=0.1), loss="mse")
    history = model.fit(x, y, epochs=25, batch_size=32, verbose=0).history["loss"]
    assert history[-1] < 0.05 * history[0]


def test_config_round_trips() -> None:
    optimizer = RAdam(learning_rate=0.01, beta_1=0.8, beta_2=0.99, epsilon=1e-6, threshold=5.0)
    again = RAdam.from_config(optimizer.get_config())
    assert (again.beta_1, again.beta_2, again.epsilon, again.threshold) == (0.8, 0.99, 1e-6, 5.0)
    assert keras.optimizers.deserialize(keras.optimizers.serialize(optimizer)).beta_2 == 0.99


def test_train_gives_radam_the_decay_its_card_records() -> None:
    """--optimizer radam recorded weight_decay 1e-4 and applied none."""
    from service.training.config import TrainConfig
    from service.training.train import _optimizer

    optimizer = _optimizer(TrainConfig(optimizer="radam", weight_decay=0.05), steps_per_epoch=10)
    assert isinstance(optimizer, RAdam) and optimizer.weight_decay == 0.05
    weights = keras.Variable(np.ones(3, np.float32))
    optimizer.apply([keras.ops.zeros(3)], [weights])  # no gradient: only the decay moves it
    assert np.all(keras.ops.convert_to_numpy(weights) < 1.0)


def test_a_radam_fit_from_before_its_decay_is_not_reused() -> None:
    """Finished fits are found by the config's fingerprint: a radam run trained before
    the decay was applied must not be published under a card that says it was."""
    import hashlib
    import json

    from service.training.config import ADDED_LATER, TrainConfig

    cfg = TrainConfig(optimizer="radam", weight_decay=1e-4)
    before = {k: v for k, v in cfg.to_card().items() if ADDED_LATER.get(k, object()) != v}
    old = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.fingerprint() != old
    # SGD and Adam apply no decoupled decay: recorded as 0.
    assert TrainConfig(optimizer="sgd", weight_decay=1e-4).weight_decay == 0.0
    assert TrainConfig(optimizer="adamw", weight_decay=1e-4).weight_decay == 1e-4


def test_decoupled_decay_spares_biases_and_normalisation() -> None:
    """AdamW and RAdam shrank BatchNorm's gamma and beta and every bias toward 0 as
    they shrank the kernels: only kernels (2-D and up) are decayed."""
    from service.training.config import TrainConfig
    from service.training.train import _optimizer

    model = keras.Sequential(
        [
            keras.Input((4, 4, 1)),
            keras.layers.Conv2D(2, 3),
            keras.layers.BatchNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    for name in ("adamw", "radam"):
        for v in model.trainable_variables:
            v.assign(np.ones(v.shape, np.float32))
        cfg = TrainConfig(optimizer=name, weight_decay=0.5, learning_rate=1.0)
        optimizer = _optimizer(cfg, steps_per_epoch=10, model=model)
        grads = [keras.ops.zeros(v.shape) for v in model.trainable_variables]
        optimizer.apply(grads, model.trainable_variables)  # no gradient: only decay moves
        after = {v.path: keras.ops.convert_to_numpy(v) for v in model.trainable_variables}
        decayed = {path for path, value in after.items() if np.all(value < 1.0)}
        kept = {path for path, value in after.items() if np.all(value == 1.0)}
        assert decayed == {v.path for v in model.trainable_variables if len(v.shape) > 1}, name
        assert kept == {v.path for v in model.trainable_variables if len(v.shape) == 1}, name
        assert len(kept) == 4, name  # conv bias, gamma, beta, dense bias
