"""Units a level leaves unused start the next level with fresh weights.

A hidden ReLU unit that keeps no weight at a level computes its bias; where
that is negative, no gradient reaches its weights, and without a fresh start
they would stay zero at every later level (issue 10: 39% of the digits CNN's
dense level).
"""

import keras
import numpy as np

import elsa_tf


def _mlp(bias=-0.5):
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(
        4,
        activation="relu",
        bias_initializer=keras.initializers.Constant(bias),
        name="hidden",
    )(inputs)
    outputs = keras.layers.Dense(3, name="out")(hidden)
    return keras.Model(inputs, outputs)


def _embed_and_prune_unit(model, unit, **kwargs):
    """Level 0 keeps every hidden weight except unit `unit`'s."""
    elsa = elsa_tf.embed(model, [0.5, 0.0], selection="per_layer", **kwargs)
    kernel = elsa.prunable_weights[0]
    rng = np.random.default_rng(0)
    # Units 0 and 3 kept whole, with weights that keep them active.
    value = rng.choice([-1, 1], kernel.shape) * rng.uniform(0.5, 1, kernel.shape)
    value = value.astype(np.float32)
    value[:, unit] = 0.0  # the smallest magnitudes: pruned first
    value[:, 1] = 1e-3
    kernel.assign(value)
    # The output layer keeps the weights of units 0 and 3 at level 0 too.
    outgoing = elsa.prunable_weights[1]
    out = np.full(outgoing.shape, 1e-3, np.float32)
    out[[0, 3]] = 0.5
    outgoing.assign(out)
    return elsa, kernel


def test_a_unit_left_unused_starts_the_next_level_from_its_initializer():
    elsa, kernel = _embed_and_prune_unit(_mlp(), unit=2)
    before = kernel.numpy()
    elsa_tf.finish_level(elsa)
    level_map = elsa.level_maps[0].numpy()
    value = kernel.numpy()
    # Level 0 kept units 0 and 3 whole, and none of units 1 and 2.
    assert (level_map[:, [0, 3]] == 0).all() and (level_map[:, [1, 2]] > 0).all()
    # Both unused units start afresh; level 0's weights are untouched.
    assert (value[:, [1, 2]] != 0).all()
    np.testing.assert_array_equal(value[:, [0, 3]], before[:, [0, 3]])
    # Their outgoing weights are free and zero: level 1 starts out computing
    # exactly what level 0 computes.
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    np.testing.assert_allclose(
        elsa_tf.extract(elsa, 1).predict(x, verbose=0),
        elsa_tf.extract(elsa, 0).predict(x, verbose=0),
        rtol=0,
        atol=0,
    )


def test_without_a_fresh_start_the_unit_would_get_no_gradient():
    elsa, kernel = _embed_and_prune_unit(_mlp(), unit=2)
    elsa_tf.finish_level(elsa)
    x = np.random.default_rng(1).normal(size=(64, 6)).astype("float32")
    y = np.argmax(x[:, :3], axis=1)
    elsa_tf.fit(
        elsa,
        x,
        y,
        epochs_per_level=2,
        batch_size=16,
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        verbose=0,
    )
    rows = elsa_tf.summary(elsa)
    assert rows[1]["zero_share"] == 0.0, rows
    # The revived units' outgoing weights trained too.
    outgoing = elsa.prunable_weights[1].numpy()
    assert (outgoing[[1, 2]] != 0).any()


def test_frozen_normalization_keeps_its_units_as_they_are():
    # Under shared="freeze", BatchNormalization's statistics froze with
    # level 0, where the unit computed a constant: fresh weights would be
    # scaled by about 1/sqrt(epsilon). Under per-level statistics they are
    # normalized by their own level's statistics, so they start afresh.
    def model():
        inputs = keras.Input((6,))
        h = keras.layers.Dense(4, name="hidden")(inputs)
        h = keras.layers.BatchNormalization(name="bn")(h)
        h = keras.layers.ReLU()(h)
        return keras.Model(inputs, keras.layers.Dense(3, name="out")(h))

    for shared, revived in (("freeze", False), ("per_level_statistics", True)):
        elsa, kernel = _embed_and_prune_unit(model(), unit=2, shared=shared)
        elsa_tf.finish_level(elsa)
        assert (kernel.numpy()[:, 2] != 0).all() == revived, shared


def test_only_a_dense_level_starts_unused_units_afresh():
    # A level that prunes spends its budget on live weights anyway; fresh
    # random weights would only compete for it.
    elsa = elsa_tf.embed(_mlp(), [0.9, 0.75, 0.0], selection="per_layer")
    kernel = elsa.prunable_weights[0]
    unit_0 = np.broadcast_to(np.arange(4) == 0, kernel.shape)
    kernel.assign(np.where(unit_0, 0.1, 1e-3).astype(np.float32))
    elsa_tf.finish_level(elsa)  # level 0 kept 2 of unit 0's weights
    assert (kernel.numpy()[~unit_0] == 0).all()  # level 1 prunes: no fresh start
    kernel.assign(np.where(unit_0, 0.1, 0.0).astype(np.float32))
    elsa_tf.finish_level(elsa)  # level 1 kept unit 0's 6 weights, nothing else
    assert (elsa.level_maps[0].numpy()[unit_0] <= 1).all()
    # Level 2 is dense: units 1 to 3 start afresh.
    assert (kernel.numpy()[~unit_0] != 0).all()
    np.testing.assert_array_equal(kernel.numpy()[unit_0], np.float32(0.1))
