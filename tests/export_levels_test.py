"""Every level from one conversion: patched files are the levels, exactly.

`export_tflite` converts the densest level and patches the others from it
(`elsa_tf.export_patch`). These tests check, for every layer type elsa_tf
prunes, that a patched level computes what Keras's `extract(model, k)` does,
what the level converted on its own does, and what the bundle makes; and
that every reason to convert a level instead does make it convert.
"""

import keras
import numpy as np
import pytest
from conftest import LOSS, cnn_with_bn, finish_levels, image_data, mlp, vector_data

import elsa_tf
from elsa_tf import elsa_model, export, lite, prunable

SPARSITIES = [0.75, 0.5, 0.0]
LAYERS = keras.layers

# One small layer of every type elsa_tf's registry prunes, with an input
# shape it takes. A type added to the registry fails
# `test_every_registered_layer_type_is_covered` until it is added here.
LAYER_CASES = {
    LAYERS.Dense: (lambda: LAYERS.Dense(6), (5,)),
    LAYERS.EinsumDense: (
        lambda: LAYERS.EinsumDense("abc,cde->abde", output_shape=(4, 2, 3)),
        (4, 6),
    ),
    LAYERS.Conv1D: (lambda: LAYERS.Conv1D(4, 3), (8, 2)),
    LAYERS.Conv2D: (lambda: LAYERS.Conv2D(4, 3), (6, 6, 2)),
    LAYERS.Conv3D: (lambda: LAYERS.Conv3D(3, 2), (4, 4, 4, 1)),
    LAYERS.Conv1DTranspose: (lambda: LAYERS.Conv1DTranspose(3, 3, strides=2), (4, 2)),
    LAYERS.Conv2DTranspose: (
        lambda: LAYERS.Conv2DTranspose(3, 3, strides=2),
        (3, 3, 2),
    ),
    LAYERS.Conv3DTranspose: (
        lambda: LAYERS.Conv3DTranspose(2, 2, strides=2),
        (2, 2, 2, 1),
    ),
    LAYERS.DepthwiseConv1D: (
        lambda: LAYERS.DepthwiseConv1D(3, depth_multiplier=2),
        (8, 2),
    ),
    LAYERS.DepthwiseConv2D: (
        lambda: LAYERS.DepthwiseConv2D(3, depth_multiplier=2),
        (6, 6, 2),
    ),
    LAYERS.SeparableConv1D: (lambda: LAYERS.SeparableConv1D(4, 3), (8, 3)),
    LAYERS.SeparableConv2D: (lambda: LAYERS.SeparableConv2D(4, 3), (6, 6, 3)),
    LAYERS.Embedding: (lambda: LAYERS.Embedding(20, 4), None),
}


def test_every_registered_layer_type_is_covered():
    assert set(prunable._REGISTRY) == set(LAYER_CASES)


def _with_batch_norm(layer_type):
    """The layer, then a BatchNormalization the converter folds into it
    (a scale per output channel), then a Dense head."""
    make, shape = LAYER_CASES[layer_type]
    if shape is None:
        inputs = keras.Input((5,), dtype="int32")
    else:
        inputs = keras.Input(shape)
    h = LAYERS.BatchNormalization()(make()(inputs))
    model = keras.Model(inputs, LAYERS.Dense(3)(LAYERS.Flatten()(h)))
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, LAYERS.BatchNormalization):
            layer.set_weights(
                [rng.uniform(0.5, 2, w.shape).astype("float32") for w in layer.weights]
            )
    return model, shape


def _inputs(shape, n=6):
    rng = np.random.default_rng(0)
    if shape is None:
        return rng.integers(0, 20, size=(n, 5)).astype("int32")
    return rng.normal(size=(n, *shape)).astype("float32")


def _run(content, x):
    return lite.runtime.predict(lite.runtime.interpreter(content), x)


def _keras(model, level, x):
    return keras.ops.convert_to_numpy(elsa_tf.extract(model, level)(x))


def _close(got, want, tolerance=1e-4):
    scale = max(float(np.abs(want).max()), 1e-6)
    assert np.abs(got - want).max() <= tolerance * scale


def _files(out, manifest):
    return [(out / row["file"]).read_bytes() for row in manifest["levels"]]


def _check_levels(model, manifest, directory, x):
    """Every level's file computes the Keras level, as the bundle's level and
    the level converted on its own (how every level was exported before)."""
    bundle = lite.read_bundle(directory / "bundle.tflite")
    for level, content in enumerate(_files(directory, manifest)):
        got = _run(content, x)
        _close(got, _keras(model, level, x))
        np.testing.assert_array_equal(_run(bundle.materialize(level), x), got)
        if manifest["levels"][level]["made_by"] == "patched":
            alone = export._convert(elsa_tf.extract(model, level), None, None, False)
            _close(got, _run(alone, x), 1e-5)


_EVERY_LAYER_TYPE = pytest.mark.parametrize(
    "layer_type",
    sorted(LAYER_CASES, key=lambda t: t.__name__),
    ids=lambda t: t.__name__,
)


@_EVERY_LAYER_TYPE
def test_patched_levels_are_the_levels(layer_type, tmp_path):
    base, shape = _with_batch_norm(layer_type)
    model = finish_levels(elsa_tf.embed(base, SPARSITIES))
    manifest = elsa_tf.export_tflite(model, tmp_path / "out")
    rows = manifest["levels"]
    assert [r["made_by"] for r in rows] == ["patched", "patched", "converted"]
    assert [r["patch_fallback"] for r in rows] == [None] * 3
    _check_levels(model, manifest, tmp_path / "out", _inputs(shape))


def _check_float16_patched(model, tmp_path):
    """Float16 levels are patched, and compute what each level converted on
    its own computes."""
    manifest = elsa_tf.export_tflite(model, tmp_path / "out", quantization="float16")
    assert [r["made_by"] for r in manifest["levels"]] == ["patched"] * 2 + ["converted"]
    x = _inputs((8, 8, 1))
    for level, content in enumerate(_files(tmp_path / "out", manifest)):
        alone = export._convert(elsa_tf.extract(model, level), "float16", None, False)
        _close(_run(content, x), _run(alone, x), 1e-5)


def test_float16_levels_are_patched_too(tmp_path):
    model = finish_levels(elsa_tf.embed(cnn_with_bn(), SPARSITIES))
    _check_float16_patched(model, tmp_path)


class Squared(LAYERS.Layer):
    """`x @ kernel**2`: the converter folds the square into one constant,
    which is no scaled copy of the kernel."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 4), name="kernel")

    def call(self, x):
        return x @ (self.kernel * self.kernel)


def _custom(layer):
    inputs = keras.Input((6,))
    return keras.Model(inputs, LAYERS.Dense(3)(layer(inputs)))


def _finished(base, **kwargs):
    return lambda: finish_levels(elsa_tf.embed(base(), SPARSITIES, **kwargs))


def _normalized_sum():
    """Two Dense branches added, then BatchNormalization, then a Dense head
    with a bias. The converter folds the normalization's scale into the
    head's kernel (found) and its shift, through that kernel, into the head's
    bias, which no zeroing of the densest file's buffers makes right."""
    inputs = keras.Input((6,))
    h = LAYERS.Dense(8, "relu")(inputs) + LAYERS.Dense(8, "relu")(inputs)
    model = keras.Model(inputs, LAYERS.Dense(3)(LAYERS.BatchNormalization()(h)))
    rng = np.random.default_rng(1)
    for w in model.weights:
        if len(w.shape) == 1:  # Biases and normalization, all nonzero.
            w.assign(rng.uniform(0.5, 2, w.shape).astype("float32"))
    return model


def _per_level_banks(base=cnn_with_bn):
    """Untrained shared weights: the densest level's normalization still has
    gamma 1 and variance 1, a constant scale, which identifies no kernel."""
    model = _finished(base, shared="per_level")()
    for bank in elsa_tf.model_ops.owner(model).banks:
        bank.assign(bank.numpy() * 1.5)  # Each level's own BatchNorm and biases.
    return model


def _per_level_normalized_sum():
    """The normalization before the head is folded into the head, which the
    patcher does not rewrite: with its own copy per level, it is declined."""
    return _per_level_banks(_normalized_sum)


@pytest.mark.parametrize(
    "reason, make, kwargs",
    [
        ("quantization", _finished(mlp), {"quantization": "dynamic"}),
        ("per_level_weights", _per_level_banks, {}),
        ("per_level_weights", _per_level_normalized_sum, {}),
        ("unmapped", _finished(lambda: _custom(Squared())), {}),
        ("outputs_differ", _finished(_normalized_sum), {}),
    ],
)
def test_each_reason_to_convert_a_level_converts_it(reason, make, kwargs, tmp_path):
    model = make()
    manifest = elsa_tf.export_tflite(model, tmp_path / "out", **kwargs)
    rows = manifest["levels"]
    assert [(r["made_by"], r["patch_fallback"]) for r in rows] == [
        ("converted", reason),
        ("converted", reason),
        ("converted", None),
    ]
    assert reason in export.PATCH_FALLBACKS
    if "quantization" not in kwargs:  # Converted levels are the levels.
        inner = elsa_tf.model_ops.owner(model).inner_model
        x = _inputs(tuple(inner.inputs[0].shape[1:]))
        for level, content in enumerate(_files(tmp_path / "out", manifest)):
            _close(_run(content, x), _keras(model, level, x))


def test_a_level_keras_cannot_check_is_converted(tmp_path, monkeypatch):
    def fails(*args):
        raise ValueError("no such input")

    monkeypatch.setattr(export, "_keras_outputs", fails)
    model = finish_levels(elsa_tf.embed(mlp(), [0.5, 0.0]))
    manifest = elsa_tf.export_tflite(model, tmp_path / "out")
    assert manifest["levels"][0]["made_by"] == "converted"
    assert manifest["levels"][0]["patch_fallback"] == "not_verified"


def test_checking_a_level_leaves_the_model_at_its_level(tmp_path):
    model = finish_levels(elsa_tf.embed(mlp(), SPARSITIES))
    elsa_tf.set_level(model, 1)
    elsa_tf.export_tflite(model, tmp_path / "out")
    assert elsa_tf.model_ops.owner(model).view_level == 1


# Every mode that gives levels their own shared weights (or statistics).
PER_LEVEL_MODES = [m for m in elsa_model.SHARED_MODES if m != "freeze"]


def _conv_bn_depthwise():
    """Conv2D -> BN -> ReLU -> DepthwiseConv2D -> BN -> ReLU (each BN folded
    into the convolution before it), a BN on its own (a multiplication and
    an addition), then a Dense head with a bias."""
    inputs = keras.Input((8, 8, 1))
    h = LAYERS.Conv2D(4, 3, padding="same")(inputs)
    h = LAYERS.ReLU()(LAYERS.BatchNormalization()(h))
    h = LAYERS.DepthwiseConv2D(3, depth_multiplier=2, padding="same")(h)
    h = LAYERS.ReLU()(LAYERS.BatchNormalization()(h))
    h = LAYERS.BatchNormalization()(h)
    return keras.Model(inputs, LAYERS.Dense(3)(LAYERS.Flatten()(h)))


def _dense_with_layer_norm():
    """Dense layers with biases around a LayerNormalization (its scale and
    offset kept as they are in the file)."""
    inputs = keras.Input((8,))
    h = LAYERS.LayerNormalization()(LAYERS.Dense(16, activation="relu")(inputs))
    return keras.Model(inputs, LAYERS.Dense(3)(h))


def _trained(base, shared, data):
    # Global ranking, as these fixtures were sized for: every level of every
    # layer changes, so every per-level copy differs between levels.
    model = elsa_tf.embed(base, SPARSITIES, shared=shared, selection="global")
    x, y = data
    elsa_tf.fit(model, x, y, epochs_per_level=1, optimizer="adam", loss=LOSS, verbose=0)
    return model


def _differ_between_levels(model, layer_type):
    """Whether every shared variable of the `layer_type` layers that the
    model keeps per level (all under "per_level", the statistics otherwise)
    has another value at each level."""
    owner = elsa_tf.model_ops.owner(model)
    shared = {id(v) for v in owner.shared_weights}
    at = [owner.effective_weights(k) for k in range(len(SPARSITIES))]
    variables = [
        v
        for layer in owner.inner_model.layers
        if isinstance(layer, layer_type)
        for v in layer.weights
        if id(v) in shared and (owner.shared == "per_level" or not v.trainable)
    ]
    return bool(variables) and all(
        not np.array_equal(at[k][id(v)], at[-1][id(v)])
        for v in variables
        for k in range(len(SPARSITIES) - 1)
    )


@pytest.mark.parametrize("shared", PER_LEVEL_MODES)
@pytest.mark.parametrize(
    "base, layer_type, data, shape",
    [
        (
            _conv_bn_depthwise,
            LAYERS.BatchNormalization,
            lambda: image_data(64),
            (8, 8, 1),
        ),
        (_dense_with_layer_norm, LAYERS.Dense, lambda: vector_data(64), (8,)),
    ],
    ids=["conv_bn_depthwise", "dense_layer_norm"],
)
def test_per_level_shared_weights_are_patched(
    shared, base, layer_type, data, shape, tmp_path
):
    if shared != "per_level" and layer_type is not LAYERS.BatchNormalization:
        pytest.skip("Only BatchNormalization statistics differ between levels.")
    model = _trained(base(), shared, data())
    assert _differ_between_levels(model, layer_type)
    manifest = elsa_tf.export_tflite(model, tmp_path / "out")
    rows = manifest["levels"]
    assert [(r["made_by"], r["patch_fallback"]) for r in rows] == [
        ("patched", None),
        ("patched", None),
        ("converted", None),
    ]
    _check_levels(model, manifest, tmp_path / "out", _inputs(shape, n=16))


def test_per_level_float16_levels_are_patched_too(tmp_path):
    model = _trained(_conv_bn_depthwise(), "per_level", image_data(64))
    _check_float16_patched(model, tmp_path)


# Layer types after which the converter folds the BatchNormalization into the
# next layer (the Dense head: Flatten does nothing to [batch, units]), with
# the first layer's bias through that layer's kernel: declined.
FOLDED_INTO_THE_NEXT_LAYER = {LAYERS.Dense}


def _own_shared_values(model, seed=1):
    """Every level's shared weights drawn apart, as per-level training leaves
    them: normalization scales and variances about 1, the rest small."""
    rng = np.random.default_rng(seed)
    owner = elsa_tf.model_ops.owner(model)
    for w in [*owner.shared_weights, *owner.banks]:
        shape = tuple(w.shape)
        if w.name.endswith(("gamma", "variance")):
            w.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
        else:
            w.assign(rng.normal(0.0, 0.1, shape).astype("float32"))
    return model


@_EVERY_LAYER_TYPE
def test_per_level_levels_of_every_layer_type_are_patched(layer_type, tmp_path):
    base, shape = _with_batch_norm(layer_type)
    model = finish_levels(elsa_tf.embed(base, SPARSITIES, shared="per_level"))
    manifest = elsa_tf.export_tflite(_own_shared_values(model), tmp_path / "out")
    expected = ("patched", None)
    if layer_type in FOLDED_INTO_THE_NEXT_LAYER:
        expected = ("converted", "per_level_weights")
    rows = manifest["levels"]
    assert [(r["made_by"], r["patch_fallback"]) for r in rows] == [
        expected,
        expected,
        ("converted", None),
    ]
    x = _inputs(shape)
    for level, content in enumerate(_files(tmp_path / "out", manifest)):
        _close(_run(content, x), _keras(model, level, x))


def test_no_dynamic_bundle_when_levels_have_their_own_statistics(tmp_path):
    # Each level's statistics, folded into a kernel, give its int8 kernel
    # scales of its own, which a bundle cannot carry.
    model = _trained(_conv_bn_depthwise(), "per_level_statistics", image_data(64))
    manifest = elsa_tf.export_tflite(
        model,
        tmp_path / "out",
        quantization="dynamic",
        representative_data=image_data(64)[0],
    )
    assert manifest["bundle"] is None
    assert "own scales" in manifest["bundle_note"]
    assert not (tmp_path / "out" / "bundle.tflite").exists()
    x = _inputs((8, 8, 1))
    for level, content in enumerate(_files(tmp_path / "out", manifest)):
        _close(_run(content, x), _keras(model, level, x), 5e-2)
