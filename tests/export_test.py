"""export_tflite: files, bundle and manifest; errors leave nothing behind."""

import os

import keras
import numpy as np
import pytest
from conftest import cnn_with_bn, finish_levels, mlp

import elsa_tf
from elsa_tf import export, lite
from elsa_tf.lite import _flatbuffer as fb

SPARSITIES = [0.75, 0.5, 0.0]


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return finish_levels(elsa_tf.embed(mlp(16, 32, 4), SPARSITIES))


def _outputs(content, x):
    return lite.runtime.predict(lite.runtime.interpreter(content), x)


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"quantization": "int4"}, ValueError, "quantization='int4'"),
        ({"quantization": "int8"}, ValueError, "representative_data=None"),
        ({"levels": [3]}, ValueError, "levels=3"),
        ({"levels": [-1]}, ValueError, "levels=-1"),
    ],
)
def test_bad_options_raise_and_write_nothing(model, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        elsa_tf.export_tflite(model, tmp_path / "out", **kwargs)
    assert _leftovers(tmp_path) == []


def test_a_model_that_is_not_embedded_raises(tmp_path):
    with pytest.raises(ValueError, match="not embedded"):
        elsa_tf.export_tflite(mlp(), tmp_path / "out")
    assert _leftovers(tmp_path) == []


def test_a_failed_conversion_leaves_no_directory(model, tmp_path, monkeypatch):
    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("converter failed")
        return real(*args)

    real = export._convert
    monkeypatch.setattr(export, "_convert", failing)
    with pytest.raises(RuntimeError, match="converter failed"):
        elsa_tf.export_tflite(model, tmp_path / "out")
    assert _leftovers(tmp_path) == []


def test_existing_directory_needs_overwrite(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="overwrite=True"):
        elsa_tf.export_tflite(model, out, levels=[0])
    assert (out / "keep.txt").read_text() == "mine"
    elsa_tf.export_tflite(model, out, levels=[0], overwrite=True)
    assert sorted(os.listdir(out)) == [
        "bundle.tflite",
        "level0_sparsity0.75.tflite",
        "manifest.json",
    ]
    assert _leftovers(tmp_path) == ["out"]


def test_a_subset_of_levels(model, tmp_path):
    manifest = elsa_tf.export_tflite(model, tmp_path / "out", levels=[2, 0])
    assert [row["level"] for row in manifest["levels"]] == [0, 2]
    bundle = lite.read_bundle(tmp_path / "out" / "bundle.tflite")
    assert bundle.levels == [0, 2]
    x = np.random.default_rng(0).normal(size=(5, 16)).astype("float32")
    for level in (0, 2):
        want = keras.ops.convert_to_numpy(elsa_tf.extract(model, level)(x))
        got = _outputs(bundle.materialize(level), x)
        np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ValueError, match="holds levels"):
        bundle.materialize(1)


def test_per_level_shared_weights_travel_as_overrides(tmp_path):
    keras.utils.set_random_seed(0)
    model = elsa_tf.embed(cnn_with_bn(), SPARSITIES, shared="per_level")
    finish_levels(model)
    # Per-level BatchNorm and bias copies: give each level different ones.
    for w in elsa_tf.model_ops.wrappers(model):
        for bank in w.banks:
            value = bank.numpy()
            for k in range(len(value)):
                value[k] *= 1 + 0.1 * (k + 1)
            bank.assign(value)
    manifest = elsa_tf.export_tflite(model, tmp_path / "out")
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")
    for level in range(len(SPARSITIES)):
        want = keras.ops.convert_to_numpy(elsa_tf.extract(model, level)(x))
        made = lite.materialize(tmp_path / "out" / "bundle.tflite", level)
        np.testing.assert_allclose(_outputs(made, x), want, atol=1e-4)
    assert manifest["bundle"]["exact"] and manifest["bundle"]["override_bytes"] > 0


def test_block_shaped_levels_run_on_the_sparse_kernel(tmp_path):
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(64), keras.layers.Dense(8)]
    )
    model = finish_levels(elsa_tf.embed(base, [0.9, 0.0], block_shape=(4, 1)))
    elsa_tf.export_tflite(model, tmp_path / "out", levels=[0])
    content = (tmp_path / "out" / "level0_sparsity0.90.tflite").read_bytes()
    sparse = [t for t in fb.read_model(content).tensors if t.sparse]
    assert sparse  # Stored block-sparse...
    assert export.integer_densify_ops(content) == 0
    assert _densify_ops(content) == 0  # ...and read by FULLY_CONNECTED itself.


def _densify_ops(content):
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    codes = [
        i
        for i, c in enumerate(model.operatorCodes)
        if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.DENSIFY
    ]
    return sum(op.opcodeIndex in codes for op in model.subgraphs[0].operators)


def test_integer_densify_ops_are_detected():
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64)])
    model = finish_levels(elsa_tf.embed(base, [0.9, 0.0]))
    extracted = elsa_tf.extract(model, 0)
    content = export._convert(extracted, "dynamic", None, True)
    assert export.integer_densify_ops(content) >= 1
    assert export.integer_densify_ops(export._convert(extracted, None, None, True)) == 0


def test_add_metadata_keeps_the_model_and_alignment(model):
    content = export._convert(elsa_tf.extract(model, 2), None, None, False)
    tagged = export.add_metadata(content, "note", b"hello")
    ref = fb.read_model(tagged)
    assert bytes(fb.buffer_bytes(tagged, ref.buffers[ref.metadata["note"]])) == (
        b"hello"
    )
    assert all(b.start % 16 == 0 for b in ref.buffers if b.size)
    x = np.ones((2, 16), np.float32)
    np.testing.assert_array_equal(_outputs(tagged, x), _outputs(content, x))
