"""RAdam, the rectified Adam of Liu et al. 2019 ("On the Variance of the Adaptive Learning
Rate and Beyond", Algorithm 2), as a Keras 3 optimizer written with ``keras.ops`` only.

Keras 3 ships no RAdam and TensorFlow Addons (which had one) is end-of-life, so it lives
here. For step t (1-based), with g the gradient:

    m_t = β1·m + (1-β1)·g              v_t = β2·v + (1-β2)·g²
    m̂_t = m_t / (1-β1^t)
    ρ∞ = 2/(1-β2) - 1                  ρ_t = ρ∞ - 2·t·β2^t / (1-β2^t)
    if ρ_t > 4:   r_t = sqrt((ρ_t-4)(ρ_t-2)ρ∞ / ((ρ∞-4)(ρ∞-2)ρ_t))
                  θ ← θ - lr · r_t · m̂_t / (sqrt(v_t / (1-β2^t)) + ε)
    else:         θ ← θ - lr · m̂_t      (momentum SGD while the variance is untrustworthy)

With β2 = 0.999 the rectified branch switches on at step 5 (ρ_5 ≈ 4.99). ``threshold``
keeps the paper's 4; PyTorch uses 5 (one step later). Decoupled weight decay comes from
the base class (``weight_decay=``), as for AdamW.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="cnnserve")
class RAdam(keras.optimizers.Optimizer):  # type: ignore[misc]
    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        threshold: float = 4.0,
        name: str = "radam",
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.threshold = threshold

    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        super().build(var_list)
        self._momentums: list[Any] = []
        self._velocities: list[Any] = []
        for var in var_list:
            self._momentums.append(
                self.add_variable_from_reference(reference_variable=var, name="momentum")
            )
            self._velocities.append(
                self.add_variable_from_reference(reference_variable=var, name="velocity")
            )

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        g = ops.cast(gradient, dtype)
        t = ops.cast(self.iterations + 1, dtype)
        beta_1 = ops.cast(self.beta_1, dtype)
        beta_2 = ops.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]

        self.assign_add(m, ops.multiply(ops.subtract(g, m), 1 - beta_1))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(g), v), 1 - beta_2))

        beta_1_t = ops.power(beta_1, t)
        beta_2_t = ops.power(beta_2, t)
        m_hat = ops.divide(m, 1 - beta_1_t)
        rho_inf = 2 / (1 - beta_2) - 1
        rho_t = rho_inf - 2 * t * beta_2_t / (1 - beta_2_t)
        # Clamped at 0: below the threshold the radicand is negative and unused.
        radicand = ops.maximum(
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t), 0.0
        )
        rectified = ops.divide(
            ops.multiply(ops.sqrt(radicand), m_hat),
            ops.add(ops.sqrt(ops.divide(v, 1 - beta_2_t)), self.epsilon),
        )
        step = ops.where(rho_t > self.threshold, rectified, m_hat)
        self.assign_sub(variable, ops.multiply(lr, step))

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "threshold": self.threshold,
            }
        )
        return config
