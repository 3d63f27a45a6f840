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


@pytest.mark.parametrize("failing_call", [1, 3])
def test_a_failed_conversion_leaves_no_directory(
    model, tmp_path, monkeypatch, failing_call
):
    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) == failing_call:
            raise RuntimeError("converter failed")
        return real(*args)

    real = export._convert
    monkeypatch.setattr(export, "_convert", failing)
    # The densest level's conversion fails, or a later one: every other level
    # is converted on its own here (its patched file is made to fail its
    # check), and the second of them fails.
    monkeypatch.setattr(export, "_verify", lambda *args: "outputs_differ")
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
    # An ordinary folder, not mkdtemp's private 0700 one.
    (tmp_path / "reference").mkdir()
    assert os.stat(out).st_mode == os.stat(tmp_path / "reference").st_mode


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
    for bank in elsa_tf.model_ops.owner(model).banks:
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


def test_block_shaped_levels_run_on_the_sparse_kernel(tmp_path, monkeypatch):
    # As if the sparse form were as fast: on a layer this small it is not, and
    # would be stored dense (`test_a_level_is_stored_sparse_only_if_not_slower`).
    monkeypatch.setattr(export, "paired_latency_ms", lambda c, x: [1.0, 1.0])
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(64), keras.layers.Dense(8)]
    )
    model = finish_levels(elsa_tf.embed(base, [0.9, 0.0], block_shape=(4, 1)))
    elsa_tf.export_tflite(model, tmp_path / "out", levels=[0], sparse_encoding=True)
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


def test_preprocessing_is_recorded(model, tmp_path):
    steps = {"scale": 1 / 16, "layout": "NC", "dtype": "float32"}
    manifest = elsa_tf.export_tflite(
        model, tmp_path / "out", levels=[2], bundle=False, preprocessing=steps
    )
    assert manifest["preprocessing"] == steps
    assert lite.read_manifest(tmp_path / "out")["preprocessing"] == steps


@pytest.mark.parametrize("bad", [[1 / 255], {"scale": object()}, "scale=1/255"])
def test_preprocessing_must_be_a_json_object(model, tmp_path, bad):
    with pytest.raises(ValueError, match="Received: preprocessing="):
        elsa_tf.export_tflite(model, tmp_path / "out", preprocessing=bad)
    assert _leftovers(tmp_path) == []


def _sparse_enough():
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(64), keras.layers.Dense(8)]
    )
    return finish_levels(elsa_tf.embed(base, [0.9, 0.0]))


@pytest.mark.parametrize(
    "timings, sparse, reason", [((1.0, 2.0), False, "slower"), ((1.0, 1.0), True, None)]
)
def test_a_level_is_stored_sparse_only_if_not_slower(
    tmp_path, monkeypatch, timings, sparse, reason
):
    calls = []

    def timed(contents, inputs):
        calls.append(len(contents))
        return list(timings)

    monkeypatch.setattr(export, "paired_latency_ms", timed)
    manifest = elsa_tf.export_tflite(
        _sparse_enough(), tmp_path / "out", levels=[0], sparse_encoding=True
    )
    row = manifest["levels"][0]
    assert calls == [2]  # Dense and sparse forms, timed side by side.
    assert row["sparse_encoding"] is sparse and row["storage_reason"] == reason
    assert row["latency_ms"] == {"dense": timings[0], "sparse": timings[1]}
    assert (row["bytes"] < row["dense_bytes"]) is sparse


def test_every_dense_stored_level_says_why(tmp_path):
    model = _sparse_enough()
    manifest = elsa_tf.export_tflite(model, tmp_path / "a")  # Dense by default.
    assert [r["storage_reason"] for r in manifest["levels"]] == ["disabled"] * 2
    assert [r["bytes"] for r in manifest["levels"]] == [
        r["dense_bytes"] for r in manifest["levels"]
    ]
    manifest = elsa_tf.export_tflite(
        model, tmp_path / "b", quantization="dynamic", sparse_encoding=True
    )
    # DENSIFY would expand the sparse int8 kernel; level 1 is fully dense.
    assert [r["storage_reason"] for r in manifest["levels"]] == [
        "densify",
        "not_smaller",
    ]
    assert set(export.STORAGE_REASONS) >= {"densify", "not_smaller", "disabled"}


def test_paired_latency_times_each_file(model):
    content = export._convert(elsa_tf.extract(model, 2), None, None, False)
    x = np.ones((1, 16), np.float32)
    ms = export.paired_latency_ms([content, content], x)
    assert len(ms) == 2 and all(0 < m < 100 for m in ms)


def _two_input_model():
    """A text-like model: int token ids through an Embedding, a float mask."""
    token_ids = keras.Input((8,), name="token_ids", dtype="int32")
    padding_mask = keras.Input((8,), name="padding_mask", dtype="float32")
    x = keras.layers.Embedding(20, 6, name="embed")(token_ids)
    x = keras.layers.Dense(12, activation="relu", name="hidden")(x)
    x = x * keras.ops.expand_dims(padding_mask, -1)
    pooled = keras.layers.GlobalAveragePooling1D()(x)
    logits = keras.layers.Dense(3, name="logits")(pooled)
    score = keras.layers.Dense(1, name="score")(pooled)
    return keras.Model(
        {"token_ids": token_ids, "padding_mask": padding_mask}, [logits, score]
    )


def test_models_with_named_inputs_and_several_outputs_export(tmp_path):
    keras.utils.set_random_seed(0)
    model = finish_levels(elsa_tf.embed(_two_input_model(), [0.5, 0.0]))
    rng = np.random.default_rng(0)
    inputs = {
        "token_ids": rng.integers(0, 20, (5, 8)).astype("int32"),
        "padding_mask": (rng.uniform(size=(5, 8)) > 0.3).astype("float32"),
    }
    labels = rng.integers(0, 3, 5)
    manifest = elsa_tf.export_tflite(
        model, tmp_path / "out", evaluation_data=(inputs, labels)
    )
    assert manifest["signature"] == "serving_default"
    assert [(i["name"], i["shape"], i["dtype"]) for i in manifest["inputs"]] == [
        ("padding_mask", [-1, 8], "float32"),
        ("token_ids", [-1, 8], "int32"),
    ]
    assert [o["name"] for o in manifest["outputs"]] == ["output_0", "output_1"]
    assert [r["made_by"] for r in manifest["levels"]] == ["patched", "converted"]
    runner = lite.LevelRunner(tmp_path / "out")
    for level in (0, 1):
        want = [
            keras.ops.convert_to_numpy(o) for o in elsa_tf.extract(model, level)(inputs)
        ]
        for source in ("file", "bundle"):
            got = runner.load(level, source=source).run(inputs)
            assert sorted(got) == ["output_0", "output_1"]
            for name, w in zip(("output_0", "output_1"), want):
                np.testing.assert_allclose(got[name], w, atol=1e-4)
        assert 0 <= manifest["levels"][level]["accuracy"] <= 1
    with pytest.raises(ValueError, match=r"inputs \['padding_mask', 'token_ids'\]"):
        runner.run({"token_ids": inputs["token_ids"]})
    with pytest.raises(ValueError, match="pass a dict"):
        runner.run(inputs["token_ids"])
    with pytest.raises(ValueError, match=r"'serving_default_token_ids:0'.*\(None, 8\)"):
        runner.run(dict(inputs, token_ids=inputs["token_ids"][:, :4]))


def test_a_keras_hub_text_backbone_exports_with_named_inputs(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(  # Built offline, no preset.
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    model = elsa_tf.embed(backbone, sparsities=[0.5, 0.0])
    manifest = elsa_tf.export_tflite(model, tmp_path / "out")
    assert [i["name"] for i in manifest["inputs"]] == [
        "padding_mask",
        "segment_ids",
        "token_ids",
    ]
    assert [o["name"] for o in manifest["outputs"]] == [
        "pooled_output",
        "sequence_output",
    ]
    rng = np.random.default_rng(0)
    inputs = {
        "token_ids": rng.integers(0, 50, (3, 8)).astype("int32"),
        "segment_ids": np.zeros((3, 8), "int32"),
        "padding_mask": np.ones((3, 8), "int32"),
    }
    assert [r["made_by"] for r in manifest["levels"]] == ["patched", "converted"]
    runner = lite.LevelRunner(tmp_path / "out")
    for level in (0, 1):
        want = elsa_tf.extract(model, level)(inputs)
        for source in ("file", "bundle"):
            got = runner.load(level, source=source).run(inputs)
            for name in ("pooled_output", "sequence_output"):
                np.testing.assert_allclose(
                    got[name], keras.ops.convert_to_numpy(want[name]), atol=1e-4
                )
