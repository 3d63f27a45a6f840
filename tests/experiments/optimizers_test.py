"""Optimizers by name: the same optimizer in Keras 3 and in tf_keras."""

import doctest

import keras
import numpy as np
import pytest
import tensorflow as tf

from elsa_tf.experiments import optimizers

SETTINGS = [
    ("adam", 1e-2, 0.0),
    ("adamw", 1e-2, 0.0),
    ("adamw", 1e-2, 0.05),
    ("sgd", 1e-1, 0.0),
    ("sgd", 1e-1, 0.05),
]
# Keys that differ in the configs by design (names, framework-only options).
_NOT_HYPERPARAMETERS = {"name", "is_legacy_optimizer", "jit_compile"}


def _hyperparameters(optimizer) -> dict:
    config = optimizer.get_config()
    return {k: v for k, v in config.items() if k not in _NOT_HYPERPARAMETERS}


def _steps(make, variable, grads):
    optimizer = make()
    for g in grads:
        optimizer.apply_gradients([(tf.constant(g), variable)])
    return np.asarray(variable.numpy())


@pytest.mark.parametrize("name, lr, wd", SETTINGS)
def test_both_backends_make_the_same_optimizer(name, lr, wd):
    made = {
        b: optimizers.factory(name, lr, wd, backend=b)() for b in ("keras", "tf_keras")
    }
    assert type(made["keras"]).__name__ == type(made["tf_keras"]).__name__
    assert type(made["keras"]).__module__.startswith("keras")
    assert type(made["tf_keras"]).__module__.startswith("tf_keras")
    a, b = (_hyperparameters(made[k]) for k in ("keras", "tf_keras"))
    shared = set(a) & set(b)
    assert {"learning_rate", "weight_decay"} <= shared
    assert {k: a[k] for k in shared} == {k: b[k] for k in shared}
    assert a["learning_rate"] == pytest.approx(lr)
    assert (a["weight_decay"] or 0.0) == pytest.approx(wd)
    if name == "sgd":
        assert a["momentum"] == optimizers.SGD_MOMENTUM == 0.9


@pytest.mark.parametrize("name, lr, wd", SETTINGS)
def test_both_backends_update_identically(name, lr, wd):
    rng = np.random.default_rng(0)
    initial = rng.normal(size=(5, 4)).astype("float32")
    grads = [rng.normal(size=(5, 4)).astype("float32") for _ in range(5)]
    got = _steps(optimizers.factory(name, lr, wd), keras.Variable(initial), grads)
    want = _steps(
        optimizers.factory(name, lr, wd, backend="tf_keras"),
        tf.Variable(initial),
        grads,
    )
    np.testing.assert_array_equal(got, want)
    assert not np.allclose(got, initial)


def test_weight_decay_is_decoupled():
    # With zero gradients the moments stay zero, so only the decay moves the
    # weight: w <- w * (1 - lr * wd) per step.
    for backend in optimizers.BACKENDS:
        variable = tf.Variable(np.ones((3,), np.float32))
        make = optimizers.factory("adamw", 0.1, 0.5, backend=backend)
        _steps(make, variable, [np.zeros((3,), np.float32)] * 2)
        np.testing.assert_allclose(variable.numpy(), (1 - 0.1 * 0.5) ** 2, rtol=1e-6)


def test_each_call_makes_a_fresh_optimizer():
    make = optimizers.factory("adam", 1e-3)
    assert make() is not make()
    assert "Adam" in repr(make) and "0.001" in repr(make)


def test_docstring_example():
    result = doctest.testmod(optimizers, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "rmsprop"}, "name='rmsprop'"),
        ({"name": "Adam"}, "name='Adam'"),
        ({"learning_rate": 0.0}, "learning_rate=0.0"),
        ({"learning_rate": -1e-3}, "learning_rate=-0.001"),
        ({"learning_rate": float("nan")}, "learning_rate=nan"),
        ({"learning_rate": "1e-3"}, "learning_rate='1e-3'"),
        ({"learning_rate": True}, "learning_rate=True"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1"),
        ({"weight_decay": float("inf")}, "weight_decay=inf"),
        ({"backend": "torch"}, "backend='torch'"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"name": "sgd", "learning_rate": 1e-3, **kwargs}
    with pytest.raises(ValueError, match="Received: " + message.replace("(", r"\(")):
        optimizers.factory(**args)


def test_adam_with_weight_decay_points_to_adamw():
    with pytest.raises(ValueError, match='use name="adamw"') as error:
        optimizers.factory("adam", 1e-3, 1e-4)
    assert "Received: name='adam', weight_decay=0.0001" in str(error.value)
