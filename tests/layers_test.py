"""Every supported layer type embeds, trains, nests, extracts and reloads."""

import keras
import numpy as np
import pytest
from conftest import LOSS

import elsa_tf


def _dense():
    inputs = keras.Input((6,))
    return keras.Model(inputs, keras.layers.Dense(5)(inputs))


def _conv(layer, shape):
    def build():
        inputs = keras.Input(shape)
        h = layer()(inputs)
        return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))

    return build


def _einsum():
    inputs = keras.Input((4, 6))
    h = keras.layers.EinsumDense("abc,cd->abd", output_shape=(4, 5), bias_axes="d")(
        inputs
    )
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))


def _transformer():
    inputs = keras.Input((4, 8))
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(inputs, inputs)
    h = keras.layers.LayerNormalization()(inputs + attention)
    h = h + keras.layers.Dense(8)(keras.layers.Dense(16, activation="relu")(h))
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def _embedding():
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(20, 4)(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))


def _nested():
    block = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="relu")], name="block"
    )
    inputs = keras.Input((6,))
    return keras.Model(inputs, keras.layers.Dense(3)(block(inputs)))


def _sequential():
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(3),
        ]
    )


MODELS = {
    "dense": (_dense, (6,)),
    "conv1d": (_conv(lambda: keras.layers.Conv1D(4, 3), (8, 2)), (8, 2)),
    "conv2d": (_conv(lambda: keras.layers.Conv2D(4, 3), (6, 6, 2)), (6, 6, 2)),
    "conv3d": (_conv(lambda: keras.layers.Conv3D(3, 2), (4, 4, 4, 1)), (4, 4, 4, 1)),
    "depthwise_conv2d": (
        _conv(lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (6, 6, 2)),
        (6, 6, 2),
    ),
    "separable_conv2d": (
        _conv(lambda: keras.layers.SeparableConv2D(4, 3), (6, 6, 3)),
        (6, 6, 3),
    ),
    "conv2d_transpose": (
        _conv(lambda: keras.layers.Conv2DTranspose(3, 3, strides=2), (3, 3, 2)),
        (3, 3, 2),
    ),
    "einsum_dense": (_einsum, (4, 6)),
    "transformer": (_transformer, (4, 8)),
    "embedding": (_embedding, None),
    "nested": (_nested, (6,)),
    "sequential": (_sequential, (6,)),
}


def _data(shape, n=48):
    rng = np.random.default_rng(1)
    if shape is None:
        x = rng.integers(0, 20, size=(n, 5)).astype("int32")
    else:
        x = rng.normal(size=(n, *shape)).astype("float32")
    return x, rng.integers(0, 3, size=n)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_layer_type_round_trip(name, tmp_path):
    build, shape = MODELS[name]
    base = build()
    x, y = _data(shape)
    sparsities = [0.75, 0.5, 0.0]
    model = elsa_tf.embed(base, sparsities)
    elsa_tf.fit(
        model,
        x,
        y,
        epochs_per_level=1,
        optimizer=keras.optimizers.Adam(1e-2),
        loss=LOSS,
        batch_size=16,
        verbose=0,
    )
    rows = elsa_tf.summary(model)
    for row in rows:
        assert (
            abs(row["achieved_sparsity"] - row["target_sparsity"])
            <= 0.005 + 1.0 / row["total"]
        )
    # Nesting, bit for bit, on every prunable weight.
    owner = elsa_tf.model_ops.owner(model)
    for weight, level_map in zip(owner.prunable_weights, owner.level_maps):
        m = level_map.numpy()
        w = weight.numpy()
        for k in range(len(sparsities) - 1):
            assert np.all((m <= k) <= (m <= k + 1))
            np.testing.assert_array_equal(
                np.where(m <= k, w, 0)[m <= k], np.where(m <= k + 1, w, 0)[m <= k]
            )
    # Extraction equals the embedded model at every level; extracted models are plain.
    for k in range(len(sparsities)):
        extracted = elsa_tf.extract(model, k)
        assert type(extracted) is type(base)
        assert not any(
            isinstance(layer, elsa_tf.ElsaModel)
            for layer in extracted._flatten_layers()
        )
        elsa_tf.set_level(model, k)
        np.testing.assert_array_equal(
            extracted.predict(x, verbose=0), model.predict(x, verbose=0)
        )
    # Save and load change nothing.
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for k in range(len(sparsities)):
        elsa_tf.set_level(model, k)
        elsa_tf.set_level(loaded, k)
        np.testing.assert_array_equal(
            loaded.predict(x, verbose=0), model.predict(x, verbose=0)
        )
