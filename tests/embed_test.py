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


def test_losses_that_layers_add_count_in_training():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(
        3, activity_regularizer=keras.regularizers.L2(100.0), name="reg"
    )(inputs)
    base = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    model = elsa_tf.embed(base, [0.5, 0.0])
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 2), "float32")
    for m in (base, model):
        m.compile(loss="mse")
    # Level 0 is still dense: the two models compute the same, regularizer too.
    np.testing.assert_allclose(
        model.evaluate(x, y, verbose=0), base.evaluate(x, y, verbose=0), rtol=1e-6
    )
    assert model.evaluate(x, y, verbose=0) > 1.0


@keras.saving.register_keras_serializable(package="elsa_tf_test")
class _Block(keras.layers.Layer):
    """A composite layer whose sublayers Keras names itself."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4)
        self.conv = keras.layers.Conv1D(4, 1)

    def build(self, shape):
        self.dense.build(shape)
        self.conv.build(shape)

    def call(self, x):
        return self.dense(x) + self.conv(x)


def test_prune_by_the_name_of_an_unnamed_sublayer_survives_copy_and_reload(tmp_path):
    inputs = keras.Input((2, 4))
    block = _Block(name="block")
    base = keras.Model(inputs, block(inputs))
    # Keras names the sublayers from a process-wide counter: the copy that
    # embed makes, and a reload, get other names than the user's model.
    model = elsa_tf.embed(base, [0.5, 0.0], prune=[block.dense.name])
    owner = model_ops.owner(model)
    assert [tuple(w.shape) for w in owner.prunable_weights] == [(4, 4)]
    model.save(tmp_path / "model.keras")
    loaded = model_ops.owner(keras.saving.load_model(tmp_path / "model.keras"))
    assert [tuple(w.shape) for w in loaded.prunable_weights] == [(4, 4)]
    assert loaded.prune == owner.prune == [0]


def test_siblings_with_one_name_are_told_apart():
    @keras.saving.register_keras_serializable(package="elsa_tf_test")
    class Twins(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.a = keras.layers.Dense(4, name="x", use_bias=False)
            self.b = keras.layers.Dense(4, name="x")

        def call(self, t):
            return self.b(self.a(t))

    twins = Twins()
    twins(np.ones((1, 4), "float32"))
    model = elsa_tf.embed(
        twins,
        [0.5, 0.0],
        prune=lambda layer: (
            isinstance(layer, keras.layers.Dense) and not layer.use_bias
        ),
    )
    owner = model_ops.owner(model)
    assert len(owner.prunable_weights) == 1
    assert owner.prunable_weights[0] is model.inner_model.a.kernel


def test_a_user_frozen_variable_stays_frozen_after_frozen_normalization_runs():
    inputs = keras.Input((4,))
    outputs = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(4)(inputs))
    model = elsa_tf.embed(keras.Model(inputs, outputs), [0.5, 0.0])
    bn = model.inner_model.get_layer("bn")
    bn.gamma.trainable = False
    model_ops.finish_level(model)  # shared="freeze": bn now runs frozen
    model(np.ones((2, 4), "float32"), training=True)
    assert bn.trainable and bn.beta.trainable and not bn.gamma.trainable


@pytest.mark.parametrize("prune", [[], iter([0]), ["dense"], [True]])
def test_elsa_model_prune_takes_a_non_empty_list_of_indices(prune):
    if isinstance(prune, type(iter([]))):
        # A generator is read once, then validated: it selects owner 0.
        assert elsa_tf.ElsaModel(mlp(), [0.5, 0.0], prune=prune).prune == [0]
        return
    with pytest.raises(TypeError, match="owner indices"):
        elsa_tf.ElsaModel(mlp(), [0.5, 0.0], prune=prune)
