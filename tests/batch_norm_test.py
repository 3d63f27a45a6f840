"""recalibrate_batch_norm: moving statistics become the batches' average."""

import keras
import numpy as np
import pytest
from conftest import LOSS, cnn_with_bn, image_data

import elsa_tf


def _dense_bn():
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(2, name="dense", kernel_initializer="ones"),
            keras.layers.BatchNormalization(name="bn", momentum=0.9),
        ]
    )


def test_moving_statistics_are_the_average_of_the_batch_statistics():
    model = _dense_bn()
    x = np.arange(24, dtype="float32").reshape(8, 3)
    assert elsa_tf.recalibrate_batch_norm(model, x, batch_size=4) == 1
    h = x.sum(axis=1, keepdims=True) * np.ones((1, 2))  # the Dense outputs
    first, second = h[:4], h[4:]
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(
        bn.moving_variance.numpy(), (first.var(axis=0) + second.var(axis=0)) / 2
    )
    assert bn.momentum == 0.9  # restored
    np.testing.assert_array_equal(model.get_layer("dense").kernel.numpy(), 1.0)


def test_a_dataset_of_pairs_and_tf_keras_models_work():
    import tensorflow as tf
    import tf_keras

    model = tf_keras.Sequential(
        [tf_keras.Input((3,)), tf_keras.layers.BatchNormalization(momentum=0.9)]
    )
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(64, 3)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, np.zeros(64))).batch(16)
    elsa_tf.recalibrate_batch_norm(model, data)
    bn = model.layers[0]
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(axis=0), rtol=1e-5)


@pytest.mark.parametrize("shared", ["freeze", "per_level_statistics"])
def test_frozen_normalization_of_finished_levels_is_left_alone(shared):
    x, y = image_data()
    model = elsa_tf.embed(cnn_with_bn(), [0.5, 0.0], shared=shared)
    elsa_tf.fit(
        model,
        x,
        y,
        levels=[0],
        epochs_per_level=1,
        optimizer="adam",
        loss=LOSS,
        verbose=0,
    )
    before = elsa_tf.extract(model, 0).predict(x, verbose=0)
    bn = model.inner_model.get_layer("bn")
    mean = bn.moving_mean.numpy()
    elsa_tf.recalibrate_batch_norm(model, x * 3.0 + 1.0)
    if shared == "freeze":
        np.testing.assert_array_equal(bn.moving_mean.numpy(), mean)
    else:  # The statistics being trained are level 1's; level 0 keeps its own.
        assert np.abs(bn.moving_mean.numpy() - mean).max() > 0.1
    after = elsa_tf.extract(model, 0).predict(x, verbose=0)
    np.testing.assert_array_equal(after, before)


@pytest.mark.parametrize("shared", ["freeze", "per_level", "per_level_statistics"])
def test_fit_recalibrates_each_level_before_freezing_it(shared):
    x, y = image_data()
    model = elsa_tf.embed(cnn_with_bn(), [0.8, 0.0], shared=shared)
    elsa_tf.fit(
        model,
        x,
        y,
        epochs_per_level=1,
        optimizer="adam",
        loss=LOSS,
        recalibration_data=x,
        verbose=0,
    )
    # Level 0's statistics are those of its own network on x: recalibrating
    # the extracted level again changes nothing.
    level0 = elsa_tf.extract(model, 0)
    bn = level0.get_layer("bn")
    mean, variance = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    elsa_tf.recalibrate_batch_norm(level0, x)
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        bn.moving_variance.numpy(), variance, rtol=1e-4, atol=1e-5
    )


def test_model_without_normalization_is_untouched():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert elsa_tf.recalibrate_batch_norm(model, np.ones((4, 3), "float32")) == 0


@pytest.mark.parametrize(
    "data, kwargs, message",
    [
        (np.zeros((0, 3), "float32"), {}, "no batch"),
        (np.ones((4, 3), "float32"), {"batch_size": 0}, "batch_size=0"),
        (np.ones((4, 3), "float32"), {"batch_size": 2.0}, "batch_size=2.0"),
    ],
)
def test_bad_arguments(data, kwargs, message):
    model = _dense_bn()
    with pytest.raises(ValueError, match=message):
        elsa_tf.recalibrate_batch_norm(model, data, **kwargs)
    assert model.get_layer("bn").momentum == 0.9


def _dead_channel_model():
    """Dense(3 -> 2, no bias) -> BN -> Dense(1): unit 1's inputs are tiny, so
    a level keeping half of the first kernel keeps only unit 0's."""
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(2, use_bias=False, name="dense"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.get_layer("dense").kernel.assign(
        np.array([[1.0, 0.01], [-1.0, 0.01], [0.5, -0.01]], "float32")
    )
    return model


def test_per_level_statistics_give_a_channel_dead_at_level_0_its_own():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 3)).astype("float32")
    y = (x @ np.array([[1.0], [2.0], [-1.0]], "float32")).astype("float32")
    model = elsa_tf.embed(
        _dead_channel_model(),
        [0.5, 0.0],
        prune=["dense"],
        shared="per_level_statistics",
    )
    bn = model.inner_model.get_layer("bn")
    # Only the statistics get a copy per level.
    assert [v.name for v in model.banks] == [
        "bank_2_moving_mean",
        "bank_3_moving_variance",
    ]

    def train(level, epochs):
        elsa_tf.fit(
            model, x, y, levels=[level], epochs_per_level=epochs, optimizer="adam",
            loss="mse", verbose=0,
        )  # fmt: skip

    train(0, epochs=1)
    kernel = model.prunable_weights[0]
    # Level 0 left unit 1 without a weight (the dense level starts it afresh).
    np.testing.assert_array_equal(model.effective_weights(0)[id(kernel)][:, 1], 0.0)
    gamma, beta = bn.gamma.numpy().copy(), bn.beta.numpy().copy()
    level0 = {k: v.copy() for k, v in model.effective_weights(0).items()}
    assert level0[id(bn.moving_variance)][1] == 0.0  # the dead channel's
    train(1, epochs=2)
    # Level 1 trained the freed weights of the channel level 0 left dead...
    assert np.all(kernel.numpy()[:, 1] != 0.0)
    # ...and normalizes it with its own statistics: those of its own network
    # on the training inputs (one batch, so the batch's biased variance).
    h = x @ kernel.numpy()
    np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), h.var(0), rtol=1e-4)
    # Level 0 keeps its statistics, and the trained parameters stay frozen.
    for k, v in model.effective_weights(0).items():
        np.testing.assert_array_equal(v, level0[k])
    np.testing.assert_array_equal(bn.gamma.numpy(), gamma)
    np.testing.assert_array_equal(bn.beta.numpy(), beta)
    level1 = elsa_tf.extract(model, 1).get_layer("bn")
    np.testing.assert_array_equal(level1.moving_variance.numpy(), bn.moving_variance)


def test_freeze_keeps_level_0_statistics_for_every_level():
    x = np.random.default_rng(0).normal(size=(96, 3)).astype("float32")
    model = elsa_tf.embed(
        _dead_channel_model(), [0.5, 0.0], prune=["dense"], shared="freeze"
    )
    elsa_tf.fit(
        model,
        x,
        x[:, :1],
        epochs_per_level=1,
        optimizer="adam",
        loss="mse",
        verbose=0,
    )
    bn = model.inner_model.get_layer("bn")
    level0 = model.effective_weights(0)
    assert bn.moving_variance.numpy()[1] == level0[id(bn.moving_variance)][1] == 0.0
