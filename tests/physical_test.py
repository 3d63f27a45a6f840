"""A narrowed model computes what the zero-masked original computes."""

import doctest
import functools

import keras
import numpy as np
import pytest
from channels_test import HAND_MODELS, by_layer, conv_bn_conv, flatten_dense

from elsa_tf import channels, physical
from elsa_tf.channels import channel_groups
from elsa_tf.experiments import zoo
from elsa_tf.physical import kept_indices, narrow


def randomize(model, seed=0):
    """Non-trivial weights everywhere, BatchNormalization statistics included
    (its variance kept near 1, so activations stay of order 1)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if variable.path.endswith(("moving_variance", "gamma")):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(size=shape) * (
                0.1 if "moving_mean" in variable.path else 1
            )
            if len(shape) > 1:  # He-style scale keeps deep models' outputs near 1
                value *= np.sqrt(2.0 / np.prod(shape[:-1]))
        variable.assign(value.astype(variable.dtype))
    return model


def random_keep(groups, seed):
    """A random subset of every free group's channels: at least one kept and,
    from two channels up, at least one dropped."""
    rng = np.random.default_rng(seed)
    keep = {}
    for index, group in enumerate(groups):
        if group.pinned is None:
            mask = rng.random(group.size) < 0.5
            order = rng.permutation(group.size)
            mask[order[0]] = True
            mask[order[1:2]] = False
            keep[index] = mask
    return keep


def zero_masked(model, groups, keep):
    """A copy of `model` whose trainable parameters of the dropped channels are
    zero (moving statistics are left alone: a zero channel stays zero)."""
    copy = keras.models.clone_model(model)
    shapes = {v.path: tuple(v.shape) for v in model.weights}
    slices = kept_indices(groups, keep, shapes)
    # By position: a clone may give variables other paths (see narrow).
    for source, variable in zip(model.weights, copy.weights):
        value = keras.ops.convert_to_numpy(source.value)
        if variable.trainable:
            for axis, kept in slices.get(source.path, {}).items():
                mask = np.zeros(value.shape[axis], bool)
                mask[kept] = True
                shape = [1] * value.ndim
                shape[axis] = -1
                value = value * mask.reshape(shape)
        variable.assign(value)
    return copy


def inputs_for(model, n=3, seed=1):
    shape = (n, *model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def check_equal_to_masked(model, seeds):
    groups = channel_groups(model)
    x = inputs_for(model)
    for seed in seeds:
        keep = random_keep(groups, seed)
        small = narrow(model, groups, keep)
        expected = zero_masked(model, groups, keep)(x, training=False)
        got = small(x, training=False)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        # Not vacuous: dropping the channels changed the outputs.
        assert np.abs(expected - model(x, training=False)).max() > 1e-2
        assert [type(a) for a in small.layers] == [type(b) for b in model.layers]
        assert [a.name for a in small.layers] == [b.name for b in model.layers]
        assert small.count_params() < model.count_params()


@pytest.mark.parametrize("name", sorted(HAND_MODELS))
def test_narrow_equals_zero_masked_hand_models(name):
    check_equal_to_masked(randomize(HAND_MODELS[name]()), seeds=range(4))


def test_narrow_equals_zero_masked_resnet20():
    check_equal_to_masked(randomize(zoo.build("resnet20", (32, 32, 3), 10)), seeds=[0])


def test_narrow_equals_zero_masked_mobilenetv2():
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classifier_activation=None
    )
    check_equal_to_masked(randomize(model), seeds=[0])


L = keras.layers


def ranked(kinds, *args):
    """Cases for `{kind}1D`, `{kind}2D` and `{kind}3D`, built with `args`."""
    return {
        f"{kind}{rank}D": functools.partial(getattr(L, f"{kind}{rank}D"), *args)
        for kind in kinds
        for rank in (1, 2, 3)
    }


# One instance of every layer class the channel rules know, by class name. A
# class added to a registry in elsa_tf.channels fails
# `test_cases_cover_the_registries` until it has a case here.
CASES = {
    "Dense": lambda: L.Dense(3),
    **ranked(("Conv",), 3, 3),
    "SeparableConv1D": lambda: L.SeparableConv1D(3, 3, padding="same"),
    "SeparableConv2D": lambda: L.SeparableConv2D(3, 3, padding="same"),
    "BatchNormalization": L.BatchNormalization,
    "DepthwiseConv1D": lambda: L.DepthwiseConv1D(3, padding="same"),
    "DepthwiseConv2D": lambda: L.DepthwiseConv2D(3, padding="same"),
    "Activation": lambda: L.Activation("tanh"),
    "ReLU": lambda: L.ReLU(max_value=6.0),
    "LeakyReLU": L.LeakyReLU,
    "ELU": L.ELU,
    "Identity": L.Identity,
    "Dropout": lambda: L.Dropout(0.5),
    **ranked(("SpatialDropout",), 0.5),
    "GaussianNoise": lambda: L.GaussianNoise(0.5),
    "GaussianDropout": lambda: L.GaussianDropout(0.5),
    "AlphaDropout": lambda: L.AlphaDropout(0.5),
    "ActivityRegularization": L.ActivityRegularization,
    "Rescaling": lambda: L.Rescaling(2.0, offset=0.5),
    **ranked(("MaxPooling", "AveragePooling", "UpSampling"), 2),
    **ranked(("GlobalMaxPooling", "GlobalAveragePooling", "ZeroPadding")),
    **ranked(("Cropping",), 1),
    "Flatten": L.Flatten,
    "Reshape": lambda: L.Reshape((4, 16)),
    **{name: getattr(L, name) for name in ("Add", "Subtract", "Multiply", "Maximum")},
    **{name: getattr(L, name) for name in ("Minimum", "Average", "Concatenate")},
    "MultiHeadAttention": lambda: L.MultiHeadAttention(3, 2),
}


def around(name):
    """conv 4 (1x1, "before") -> the layer -> flatten -> Dense 2, on 4-wide
    inputs of the layer's rank; a merge joins "before" with a second conv."""
    rank = 1 if name.endswith("1D") else 3 if name.endswith("3D") else 2
    conv = {1: L.Conv1D, 2: L.Conv2D, 3: L.Conv3D}[rank]
    inputs = keras.Input((4,) * rank + (3,), name="x")
    h = conv(4, 1, name="before")(inputs)
    layer = CASES[name]()
    if isinstance(layer, (*channels.MERGES, L.Concatenate)):
        h = layer([h, conv(4, 1, name="other")(inputs)])
    elif isinstance(layer, channels.ATTENTION):
        h = layer(h, h)
    else:
        h = layer(h)
    h = L.Dense(2, name="out")(L.Flatten(name="flat")(h))
    return keras.Model(inputs, h, name=name)


def test_cases_cover_the_registries():
    registered = (
        *channels.PRODUCERS,
        *channels.SEPARABLE,
        *channels.FOLLOWERS,
        *channels.PASS_THROUGH,
        *channels.MERGES,
        *channels.RESHAPES,
        *channels.ATTENTION,
    )
    assert sorted(CASES) == sorted(kind.__name__ for kind in registered)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_registered_layer_narrows(name):
    model = randomize(around(name))
    groups = channel_groups(model)
    before = [g for g in groups if "before" in g.layers]
    assert before and all(g.pinned is None for g in before)
    check_equal_to_masked(model, seeds=[0])


def test_narrow_around_a_pinned_layer():
    """A layer the rules cannot follow keeps its width; the layers around it
    still narrow."""
    inputs = keras.Input((3, 3, 2), name="x")
    h = L.Conv2D(4, 1, name="before")(inputs)
    h = L.LayerNormalization(name="ln")(h)
    h = L.Conv2D(5, 1, name="after")(h)
    model = randomize(keras.Model(inputs, L.Conv2D(2, 1, name="out")(h)))
    check_equal_to_masked(model, seeds=range(2))


def test_attention_with_a_multi_axis_output_keeps_it():
    """An attention layer whose output_shape has two axes is pinned, and the
    narrowed copy keeps that shape while the Dense layer after it narrows."""
    inputs = keras.Input((5, 3), name="x")
    h = L.Dense(6, name="before")(inputs)
    h = L.MultiHeadAttention(2, 2, output_shape=(2, 3), name="mha")(h, h)
    h = L.Dense(5, name="after")(L.Flatten(name="flat")(h))
    model = randomize(keras.Model(inputs, L.Dense(2, name="out")(h)))
    groups = channel_groups(model)
    assert by_layer(groups, "after").pinned is None
    check_equal_to_masked(model, seeds=[0, 1])
    small = narrow(model, groups, random_keep(groups, 0))
    assert small.get_layer("mha").output.shape == (None, 5, 2, 3)
    assert small.get_layer("after").units < 5


class Scale(keras.layers.Layer):
    """A custom layer with an unnamed variable: a clone numbers it afresh."""

    def build(self, shape):
        self.scale = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale


def test_nested_models_and_custom_layers_keep_their_values():
    """A nested Sequential's variables and a custom layer's unnamed one get
    other paths in the copy; narrow pairs them by position."""
    inputs = keras.Input((4, 4, 3), name="x")
    stem = keras.Sequential([L.Conv2D(4, 1, name="stem_conv")], name="stem")
    h = Scale(name="scale")(stem(inputs))
    h = L.Conv2D(5, 1, name="c")(h)
    h = L.GlobalAveragePooling2D(name="pool")(h)
    model = randomize(keras.Model(inputs, L.Dense(2, name="out")(h)))
    assert by_layer(channel_groups(model), "c").pinned is None
    check_equal_to_masked(model, seeds=[0, 1])


def test_parameter_counts_by_hand():
    """conv 3->4 (3x3, bias) -> BN -> conv 4->5 (1x1, bias), keeping 2 of 4:
    conv 3*3*3*4+4 = 112 -> 56, BN 4*4 = 16 -> 8, conv 4*5+5 = 25 -> 15."""
    model = conv_bn_conv()
    groups = channel_groups(model)
    small = narrow(model, groups, {1: np.array([True, False, False, True])})
    counts = {layer.name: layer.count_params() for layer in small.layers}
    assert counts == {"x": 0, "c1": 56, "bn": 8, "relu": 0, "c2": 15}
    assert model.count_params() == 112 + 16 + 25
    assert small.get_layer("c1").filters == 2
    np.testing.assert_array_equal(
        small.get_layer("c1").kernel.numpy(),
        model.get_layer("c1").kernel.numpy()[..., [0, 3]],
    )


def test_input_model_is_not_modified():
    model = randomize(flatten_dense())
    before = [w.copy() for w in model.get_weights()]
    groups = channel_groups(model)
    narrow(model, groups, random_keep(groups, 0))
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert model.get_layer("conv").filters == 3


def test_narrowed_model_saves_and_reloads(tmp_path):
    model = randomize(HAND_MODELS["sequential"]())
    groups = channel_groups(model)
    small = narrow(model, groups, random_keep(groups, 3))
    small.save(tmp_path / "small.keras")
    loaded = keras.saving.load_model(tmp_path / "small.keras")
    x = inputs_for(model)
    np.testing.assert_array_equal(loaded(x, training=False), small(x, training=False))
    assert type(loaded) is type(model)


@pytest.mark.parametrize(
    "keep, message",
    [
        ({9: np.ones(3, bool)}, r"keep names groups that do not exist.*\[9\]"),
        ({1: np.ones(3, bool)}, r"shape \(4,\) for group 1 \(layers \['c1'"),
        ({1: np.ones(4, int)}, "must be a boolean array"),
        ({1: np.zeros(4, bool)}, r"drops every channel of group 1 \(layers \['c1'"),
        ({2: np.eye(5, dtype=bool)[0]}, r"pinned \(model output 'c2'\)"),
    ],
)
def test_bad_keep(keep, message):
    model = conv_bn_conv()
    with pytest.raises(ValueError, match=message):
        narrow(model, channel_groups(model), keep)


def test_groups_of_another_model():
    groups = channel_groups(conv_bn_conv())
    with pytest.raises(ValueError, match="groups found on another model"):
        narrow(flatten_dense(), groups, {1: np.array([True, False, True, True])})


def test_docstring_examples():
    failures, tried = doctest.testmod(physical)
    assert tried and not failures
