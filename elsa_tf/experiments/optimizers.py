"""Optimizers by name, built the same way for Keras 3 and for tf_keras.

The training program trains ELSA with Keras 3 and the independent tfmot
baseline with tf_keras (Keras 2). `factory` gives both sides the same
optimizer: the same class and hyperparameters in either framework, whose
updates agree bit for bit on the same gradients (tested). Each call of the
returned factory makes a fresh optimizer, as every ELSA level and every
baseline model starts with clean optimizer state.

Weight decay is the optimizers' decoupled weight decay (Loshchilov & Hutter,
2019), `variable -= learning_rate * weight_decay * variable` at every step,
which Keras 3 and tf_keras apply identically. It is applied to every trainable
variable, biases and normalization parameters included, as both frameworks do
by default.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd")
BACKENDS: tuple[str, ...] = ("keras", "tf_keras")

# Plain SGD (Keras's default momentum is 0) trains small CNNs several times
# slower at the same learning rate; 0.9 is the momentum of the ResNet, RigL
# and ELSA recipes.
SGD_MOMENTUM = 0.9

_CLASSES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}


def _check_number(name: str, value, *, positive: bool) -> float:
    bound = "> 0" if positive else ">= 0"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        raise ValueError(
            f"{name} must be a finite number {bound}. Received: {name}={value!r}"
        )
    return float(value)


def _module(backend: str):
    if backend == "keras":
        import keras

        return keras.optimizers
    if backend == "tf_keras":
        import tf_keras

        return tf_keras.optimizers  # The TF 2.11+ optimizers, not `legacy`.
    raise ValueError(
        f"backend must be one of {BACKENDS}. Received: backend={backend!r}"
    )


def factory(
    name: str,
    learning_rate: float,
    weight_decay: float = 0.0,
    *,
    backend: str = "keras",
) -> Callable[[], object]:
    """A zero-argument callable returning a fresh optimizer on each call.

    Args:
        name: `"adam"`, `"adamw"` or `"sgd"` (SGD with momentum
            `SGD_MOMENTUM`, 0.9).
        learning_rate: the constant learning rate, > 0.
        weight_decay: decoupled weight decay, >= 0. `"adam"` takes none:
            Adam with decoupled weight decay is AdamW, so ask for `"adamw"`
            (which with `weight_decay=0` is plain Adam).
        backend: `"keras"` for `keras.optimizers` (Keras 3, ELSA) or
            `"tf_keras"` for `tf_keras.optimizers` (Keras 2, the tfmot
            baseline).

    Returns:
        A `functools.partial` of the optimizer class: its repr names the class
        and hyperparameters, and `elsa_tf.fit` accepts it as `optimizer`.

    Raises:
        ValueError: for an unknown name or backend, a learning rate that is
            not positive, a negative weight decay, or `"adam"` with weight
            decay.

    Example:

    >>> make = factory("sgd", 0.1, weight_decay=5e-4)
    >>> optimizer = make()
    >>> type(optimizer).__name__, float(optimizer.momentum)
    ('SGD', 0.9)
    >>> make() is optimizer
    False
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"name must be one of {OPTIMIZERS}. Received: name={name!r}")
    learning_rate = _check_number("learning_rate", learning_rate, positive=True)
    weight_decay = _check_number("weight_decay", weight_decay, positive=False)
    if name == "adam" and weight_decay:
        raise ValueError(
            'Adam with decoupled weight decay is AdamW: use name="adamw" (or '
            'weight_decay=0 with "adam"). '
            f"Received: name='adam', weight_decay={weight_decay}"
        )
    module = _module(backend)
    kwargs = {"learning_rate": learning_rate}
    if name == "adamw" or weight_decay:
        # Passed to AdamW even when 0: its own default is 0.004.
        kwargs["weight_decay"] = weight_decay
    if name == "sgd":
        kwargs["momentum"] = SGD_MOMENTUM
    return functools.partial(getattr(module, _CLASSES[name]), **kwargs)
