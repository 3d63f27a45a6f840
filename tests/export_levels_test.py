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
from conftest import cnn_with_bn, finish_levels, mlp

import elsa_tf
from elsa_tf import export, lite, prunable

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


@pytest.mark.parametrize(
    "layer_type",
    sorted(LAYER_CASES, key=lambda t: t.__name__),
    ids=lambda t: t.__name__,
)
def test_patched_levels_are_the_levels(layer_type, tmp_path):
    base, shape = _with_batch_norm(layer_type)
    model = finish_levels(elsa_tf.embed(base, SPARSITIES))
    manifest = elsa_tf.export_tflite(model, tmp_path / "out")
    rows = manifest["levels"]
    assert [r["made_by"] for r in rows] == ["patched", "patched", "converted"]
    assert [r["patch_fallback"] for r in rows] == [None] * 3
    bundle = lite.read_bundle(tmp_path / "out" / "bundle.tflite")
    x = _inputs(shape)
    for level, content in enumerate(_files(tmp_path / "out", manifest)):
        got = _run(content, x)
        _close(got, _keras(model, level, x))
        # The same outputs as the bundle's level and as the level converted
        # on its own, the way every level was exported before.
        np.testing.assert_array_equal(_run(bundle.materialize(level), x), got)
        if rows[level]["made_by"] == "patched":
            alone = export._convert(elsa_tf.extract(model, level), None, None, False)
            _close(got, _run(alone, x), 1e-5)


def test_float16_levels_are_patched_too(tmp_path):
    model = finish_levels(elsa_tf.embed(cnn_with_bn(), SPARSITIES))
    manifest = elsa_tf.export_tflite(model, tmp_path / "out", quantization="float16")
    assert [r["made_by"] for r in manifest["levels"]] == ["patched"] * 2 + ["converted"]
    x = _inputs((8, 8, 1))
    for level, content in enumerate(_files(tmp_path / "out", manifest)):
        alone = export._convert(elsa_tf.extract(model, level), "float16", None, False)
        _close(_run(content, x), _run(alone, x), 1e-5)


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


def _per_level_banks():
    model = _finished(cnn_with_bn, shared="per_level")()
    for bank in elsa_tf.model_ops.owner(model).banks:
        bank.assign(bank.numpy() * 1.5)  # Each level's own BatchNorm and biases.
    return model


@pytest.mark.parametrize(
    "reason, make, kwargs",
    [
        ("quantization", _finished(mlp), {"quantization": "dynamic"}),
        ("per_level_weights", _per_level_banks, {}),
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
