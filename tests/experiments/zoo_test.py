"""The zoo's models: buildable, the same in keras and tf_keras, embeddable."""

import doctest

import keras
import numpy as np
import pytest

import elsa_tf
from elsa_tf import model_ops
from elsa_tf.experiments import zoo

# The smallest input each model is meant for: cheap to build and to run.
SMALL_SHAPE = {
    "mlp": (8, 8, 1),
    "cnn": (8, 8, 1),
    "lenet5": (8, 8, 1),
    "cnn1d": (40,),
    "resnet20": (8, 8, 3),
    "mobilenetv2": (8, 8, 3),
}
IMAGES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]
COMPATIBLE = (
    [("mlp", s) for s in [(40,), *IMAGES]]
    + [("cnn1d", s) for s in [(40,), (40, 1), (40, 2)]]
    + [(n, s) for n in ("cnn", "lenet5", "resnet20", "mobilenetv2") for s in IMAGES]
)
PRUNABLE_TYPES = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
)


def _numpy(tensor):
    return np.asarray(tensor)


def _inputs(shape, batch=2, seed=0):
    return np.random.default_rng(seed).uniform(size=(batch, *shape)).astype("float32")


def test_docstring_examples():
    result = doctest.testmod(zoo)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("name,shape", COMPATIBLE)
def test_builds_logits_for_every_compatible_shape(name, shape):
    model = zoo.build(name, shape, num_classes=7)
    assert model.name == name
    assert _numpy(model(_inputs(shape), training=False)).shape == (2, 7)
    # Logits, not probabilities: the last layer has no activation.
    assert model.layers[-1].get_config()["activation"] == "linear"


@pytest.mark.parametrize("name", zoo.MODELS)
def test_tf_keras_build_outputs_logits(name):
    import tf_keras

    model = zoo.build(name, SMALL_SHAPE[name], 5, backend="tf_keras")
    assert isinstance(model, tf_keras.Model)
    assert _numpy(model(_inputs(SMALL_SHAPE[name]), training=False)).shape == (2, 5)


def _randomize_normalization(model, seed=0):
    """Moves every BN layer away from the identity, so that copying its four
    weights into the wrong slots would change the outputs."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights(
                [rng.uniform(0.5, 1.5, size=w.shape) for w in layer.get_weights()]
            )


@pytest.mark.parametrize("name", zoo.MODELS)
def test_keras_and_tf_keras_builds_are_the_same_architecture(name):
    shape = SMALL_SHAPE[name]
    k = zoo.build(name, shape, 5)
    t = zoo.build(name, shape, 5, backend="tf_keras")

    assert [layer.name for layer in k.layers] == [layer.name for layer in t.layers]
    assert [type(layer).__name__ for layer in k.layers] == [
        type(layer).__name__ for layer in t.layers
    ]
    assert [layer.count_params() for layer in k.layers] == [
        layer.count_params() for layer in t.layers
    ]
    assert k.count_params() == t.count_params()

    # The same function of the same weights: copy them over by layer name.
    _randomize_normalization(k)
    for layer in k.layers:
        t.get_layer(layer.name).set_weights(layer.get_weights())
    x = _inputs(shape, batch=4)
    np.testing.assert_allclose(
        _numpy(t(x, training=False)),
        _numpy(k(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("name", zoo.MODELS)
def test_layer_names_do_not_depend_on_what_was_built_before(name):
    first = [layer.name for layer in zoo.build(name, SMALL_SHAPE[name], 3).layers]
    second = [layer.name for layer in zoo.build(name, SMALL_SHAPE[name], 3).layers]
    assert first == second


@pytest.mark.parametrize("name", zoo.MODELS)
def test_embed_prunes_every_dense_and_conv_kernel(name):
    shape = SMALL_SHAPE[name]
    base = zoo.build(name, shape, 4)
    model = elsa_tf.embed(base, sparsities=[0.5, 0.0])
    pruned = sorted(model_ops.owner(model).weight_owners)
    expected = sorted(
        layer.name for layer in base.layers if isinstance(layer, PRUNABLE_TYPES)
    )
    assert pruned == expected and expected
    x = _inputs(shape)
    # Nothing is pruned before training: level 0 still computes `base`.
    np.testing.assert_allclose(
        _numpy(model(x, training=False)), _numpy(base(x, training=False)), atol=1e-5
    )


def test_cnn_is_the_digits_example_cnn():
    model = zoo.build("cnn", (8, 8, 1), 10)
    weighted = [(layer.name, layer.count_params()) for layer in model.layers]
    assert [(n, c) for n, c in weighted if c] == [
        ("conv1", 3 * 3 * 1 * 16 + 16),
        ("bn1", 4 * 16),
        ("conv2", 3 * 3 * 16 * 32 + 32),
        ("bn2", 4 * 32),
        ("fc", 4 * 4 * 32 * 64 + 64),
        ("logits", 64 * 10 + 10),
    ]


def test_resnet20_has_the_papers_size():
    model = zoo.build("resnet20", (32, 32, 3), 10)
    conv = 3 * 3 * 3 * 16  # stem
    conv += 6 * 3 * 3 * 16 * 16  # stage 1: 3 blocks x 2 convs
    conv += 3 * 3 * 16 * 32 + 5 * 3 * 3 * 32 * 32  # stage 2
    conv += 3 * 3 * 32 * 64 + 5 * 3 * 3 * 64 * 64  # stage 3
    bn = 4 * (16 + 6 * 16 + 6 * 32 + 6 * 64)  # after each conv
    option_b = 16 * 32 + 4 * 32 + 32 * 64 + 4 * 64  # 1x1 shortcut conv + BN
    dense = 64 * 10 + 10
    assert model.count_params() == conv + bn + option_b + dense == 274_042
    # He et al. (2016), table 6: 0.27M.
    assert 0.265e6 < model.count_params() < 0.275e6
    assert sum(isinstance(x, keras.layers.Conv2D) for x in model.layers) == 19 + 2


def test_lenet5_on_28x28_is_lenet5():
    model = zoo.build("lenet5", (28, 28, 1), 10)
    assert model.get_layer("flatten").output.shape == (None, 16 * 5 * 5)
    assert model.count_params() == 61_706  # LeNet-5's count on MNIST


def test_mobilenetv2_has_inverted_residual_blocks():
    model = zoo.build("mobilenetv2", (32, 32, 3), 10)
    assert 0.3e6 < model.count_params() < 0.5e6
    expand = model.get_layer("block2_expand_conv")
    assert expand.kernel.shape == (1, 1, 16, 6 * 16)
    assert model.get_layer("block3_add").output.shape == (None, 32, 32, 24)
    assert model.get_layer("head_conv").output.shape == (None, 8, 8, 4 * 96)


def test_width_scales_hidden_layers_only():
    narrow = zoo.build("cnn1d", (40,), 10, width=0.5)
    assert narrow.get_layer("conv1_conv").filters == 16
    assert narrow.get_layer("fc").units == 32
    assert narrow.get_layer("logits").units == 10
    assert zoo.build("mlp", (4,), 3, width=0.001).get_layer("fc1").units == 1


def test_cnn1d_reshapes_a_vector_signal():
    flat = zoo.build("cnn1d", (40,), 10)
    channels = zoo.build("cnn1d", (40, 1), 10)
    assert flat.count_params() == channels.count_params()
    assert "reshape" in [layer.name for layer in flat.layers]


@pytest.mark.parametrize(
    "name,shape,match",
    [
        ("cnn1d", (8, 8, 1), r"'cnn1d' takes \(length,\).*input_shape=\(8, 8, 1\)"),
        ("cnn", (40,), r"'cnn' takes \(height, width, channels\).*input_shape=\(40,\)"),
        ("resnet20", (32, 32), r"model='resnet20', input_shape=\(32, 32\)"),
        ("lenet5", (3, 3, 1), r"at least 4x4.*model='lenet5', input_shape=\(3, 3, 1\)"),
        ("cnn", (1, 8, 1), r"at least 2x2.*input_shape=\(1, 8, 1\)"),
        ("mlp", (), r"positive ints.*input_shape=\(\)"),
        ("mlp", (8, 0), r"positive ints.*input_shape=\(8, 0\)"),
        ("mlp", 8, r"positive ints.*input_shape=8"),
        ("vgg16", (32, 32, 3), r"Unknown model.*model='vgg16'"),
    ],
)
def test_incompatible_shapes_and_unknown_models(name, shape, match):
    with pytest.raises(ValueError, match=match):
        zoo.check_compatible(name, shape)
    with pytest.raises(ValueError, match=match):
        zoo.build(name, shape, 10)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"backend": "tf.keras"}, r"Unknown backend.*backend='tf.keras'"),
        ({"num_classes": 0}, r"num_classes must be at least 1.*num_classes=0"),
        ({"num_classes": 2.0}, r"num_classes must be an int.*num_classes=2.0"),
        ({"width": 0.0}, r"width must be a positive number.*width=0.0"),
        ({"width": "1"}, r"width must be a positive number.*width='1'"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        zoo.build("mlp", (4,), **args)
