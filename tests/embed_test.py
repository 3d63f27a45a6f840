"""embed / extract / summary: construction, options and bad input."""

import keras
import numpy as np
import pytest
from conftest import LOSS, cnn_with_bn, image_data, mlp, vector_data

import elsa_tf
from elsa_tf import model_ops


def _weights(model):
    return [w.copy() for w in model.get_weights()]


def test_input_model_is_not_modified():
    base = cnn_with_bn()
    before = _weights(base)
    model = elsa_tf.embed(base, [0.9, 0.0])
    x, y = image_data()
    elsa_tf.fit(
        model,
        x,
        y,
        epochs_per_level=1,
        optimizer=keras.optimizers.Adam(0.05),
        loss=LOSS,
        verbose=0,
    )
    for a, b in zip(before, base.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert model.inner_model is not base
    assert not {id(v) for v in model.weights} & {id(v) for v in base.weights}


def test_sparsity_zero_leaves_the_model_exactly_dense():
    base = cnn_with_bn()
    x, _ = image_data()
    model = elsa_tf.embed(base, [0.0])
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), base.predict(x, verbose=0)
    )
    model_ops.finish_level(model)
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), base.predict(x, verbose=0)
    )
    assert elsa_tf.summary(model)[0]["achieved_sparsity"] == 0.0


def test_one_owner_holds_a_map_per_kernel_and_everything_else_is_shared():
    model = elsa_tf.embed(cnn_with_bn(), [0.5, 0.0])
    owner = model_ops.owner(model)
    assert owner is model
    assert owner.weight_owners == ["conv", "hidden", "logits"]
    assert [v.path for v in owner.prunable_weights] == [
        "conv/kernel",
        "hidden/kernel",
        "logits/kernel",
    ]
    assert sorted(v.path for v in owner.shared_weights) == [
        "bn/beta",
        "bn/gamma",
        "bn/moving_mean",
        "bn/moving_variance",
        "conv/bias",
        "hidden/bias",
        "logits/bias",
    ]
    assert [m.dtype for m in owner.level_maps] == ["uint8"] * 3


@pytest.mark.parametrize(
    "prune, expected",
    [
        (keras.layers.Conv2D, {"conv"}),
        ((keras.layers.Conv2D, keras.layers.Dense), {"conv", "hidden", "logits"}),
        (["hidden"], {"hidden"}),
        ("logits", {"logits"}),
        (lambda layer: layer.name != "logits", {"conv", "hidden"}),
    ],
)
def test_prune_filters(prune, expected):
    model = elsa_tf.embed(cnn_with_bn(), [0.5, 0.0], prune=prune)
    assert set(model_ops.owner(model).weight_owners) == expected


@pytest.mark.parametrize(
    "prune, error, message",
    [
        (["nope"], ValueError, r"does not have: \['nope'\]"),
        (["bn"], ValueError, r"no prunable weights: \['bn'\]"),
        (42, TypeError, "prune=42"),
        ([1, 2], TypeError, r"prune=\[1, 2\]"),
        (int, TypeError, "Keras layer classes"),
        (keras.layers.LSTM, ValueError, "no prunable layers"),
    ],
)
def test_bad_prune_filters(prune, error, message):
    with pytest.raises(error, match=message):
        elsa_tf.embed(cnn_with_bn(), [0.5, 0.0], prune=prune)


def test_model_without_prunable_layers():
    base = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    with pytest.raises(ValueError, match="no prunable layers"):
        elsa_tf.embed(base, [0.5, 0.0])


def test_a_model_keras_cannot_copy_gets_told_what_to_do():
    class Net(keras.Model):  # its config does not re-create it
        def __init__(self, width):
            super().__init__()
            self.dense = keras.layers.Dense(width)

        def call(self, x):
            return self.dense(x)

    net = Net(2)
    net(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="Net cannot be copied.*get_config"):
        elsa_tf.embed(net, [0.5, 0.0])


def test_an_unbuilt_model_is_refused():
    with pytest.raises(ValueError, match="not built"):
        elsa_tf.embed(keras.Sequential([keras.layers.Dense(2)]), [0.5, 0.0])


def test_bad_arguments_to_embed():
    with pytest.raises(TypeError, match="keras.Model"):
        elsa_tf.embed("model", [0.5])
    with pytest.raises(ValueError, match="strictly decreasing"):
        elsa_tf.embed(mlp(), [0.1, 0.5])
    with pytest.raises(ValueError, match="shared=.copy."):
        elsa_tf.embed(mlp(), [0.5], shared="copy")
    with pytest.raises(ValueError, match="selection=.best."):
        elsa_tf.embed(mlp(), [0.5], selection="best")
    with pytest.raises(TypeError, match="schedule=3"):
        elsa_tf.embed(mlp(), [0.5], schedule=3)
    with pytest.raises(ValueError, match="already embedded"):
        elsa_tf.embed(elsa_tf.embed(mlp(), [0.5]), [0.5])


def test_not_embedded_models_are_refused():
    for call in (
        lambda: elsa_tf.extract(mlp(), 0),
        lambda: elsa_tf.summary(mlp()),
        lambda: elsa_tf.set_level(mlp(), 0),
        lambda: elsa_tf.fit(mlp(), epochs_per_level=1, optimizer="adam", loss=LOSS),
    ):
        with pytest.raises(ValueError, match="not embedded"):
            call()


@pytest.mark.parametrize("level", [-1, 2, 1.0, True, None])
def test_extract_level_out_of_range(level):
    model = elsa_tf.embed(mlp(), [0.5, 0.0])
    with pytest.raises(ValueError, match=f"level=.*{level!r}"):
        elsa_tf.extract(model, level)


def test_global_selection_hits_the_global_target():
    x, y = vector_data()
    base = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(64, name="wide"), keras.layers.Dense(3)]
    )
    model = elsa_tf.embed(base, [0.9, 0.0], selection="global")
    elsa_tf.fit(
        model,
        x,
        y,
        epochs_per_level=1,
        optimizer=keras.optimizers.Adam(0.01),
        loss=LOSS,
        verbose=0,
    )
    rows = elsa_tf.summary(model, per_layer=True)
    assert abs(rows[0]["achieved_sparsity"] - 0.9) < 0.005
    per_layer = [layer["sparsity"] for layer in rows[0]["layers"]]
    assert max(per_layer) - min(per_layer) > 0.01  # layers differ under global


def test_custom_layer_protocol():
    @keras.saving.register_keras_serializable(package="elsa_tf_test")
    class Scale(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(
                shape=input_shape[-1:], initializer="ones", name="w"
            )
            self.b = self.add_weight(
                shape=input_shape[-1:], initializer="zeros", name="b"
            )

        def call(self, x):
            return x * self.w + self.b

        def get_prunable_weights(self):
            return [self.w]

    inputs = keras.Input((10,))
    base = keras.Model(inputs, Scale(name="scale")(inputs))
    assert isinstance(base.layers[1], elsa_tf.PrunableLayer)
    model = elsa_tf.embed(base, [0.6, 0.0])
    owner = model_ops.owner(model)
    assert [v.name for v in owner.prunable_weights] == ["w"]
    assert [v.name for v in owner.shared_weights] == ["b"]
    model_ops.prune_to(model, 0.6)
    x = np.ones((1, 10), "float32")
    assert int(np.count_nonzero(model.predict(x, verbose=0))) == 4


def test_a_layer_used_twice_has_one_level_map():
    dense = keras.layers.Dense(4, name="shared")
    a, b = keras.Input((4,)), keras.Input((4,))
    base = keras.Model([a, b], dense(a) + dense(b))
    model = elsa_tf.embed(base, [0.5, 0.0])
    assert len(model_ops.owner(model).level_maps) == 1


def test_summary_prints_a_table():
    model = elsa_tf.embed(mlp(), [0.75, 0.0])
    model_ops.finish_level(model)
    rows = elsa_tf.summary(model)
    assert [r["status"] for r in rows] == ["finished", "training"]
    assert rows[0]["kept"] == round(0.25 * rows[0]["total"])
    text = str(rows)
    assert "75.00%" in text and "finished" in text
