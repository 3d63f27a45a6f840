"""Channel levels export as physically narrower TFLite files.

`export_tflite` on a model embedded with `granularity="channel"` converts
every level's `extract(model, level, physical=True)` on its own
(`elsa_tf.export_channels`): each file is smaller than the densest level's,
its tensors narrower, its outputs those of the Keras level. The bundle, from
which `elsa_tf.lite` makes these files on the device, is tested in
`channel_bundle_test.py`.
"""

import json

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from conftest import finish_levels, mlp

import elsa_tf
from elsa_tf import export, lite, sparsifiers

L = keras.layers
SPARSITIES = [0.5, 0.0]
# What each quantization's file must match of the Keras level, relative to
# the largest output: export's own tolerances for float32 and float16; int8
# weights (and, for "int8", activations) are looser, so only a bound that
# catches a wrong model.
TOLERANCE = {None: 1e-4, "float16": 1e-2, "dynamic": 0.1, "int8": 0.2}


def conv_bn(width=8):
    """Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> GAP -> Dense 3 on 8x8x1,
    both convolutions `width` wide, with normalization statistics that are
    not the identity."""
    inputs = keras.Input((8, 8, 1), name="x")
    h = L.Conv2D(width, 3, padding="same", name="c1")(inputs)
    h = L.ReLU(name="r1")(L.BatchNormalization(name="bn1")(h))
    h = L.Conv2D(width, 3, padding="same", name="c2")(h)
    h = L.ReLU(name="r2")(L.BatchNormalization(name="bn2")(h))
    h = L.GlobalAveragePooling2D(name="gap")(h)
    model = keras.Model(inputs, L.Dense(3, name="fc")(h), name="conv_bn")
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, w.shape).astype("float32")
                    for w in layer.weights
                ]
            )
    return model


MODELS = {
    "conv_bn": conv_bn,
    # The converter quantizes weights of 1024 elements or more only: c2's
    # kernel is 9 x 16 x 16 at level 0.
    "wide_conv_bn": lambda: conv_bn(width=32),
    "mlp": mlp,
}


def embedded(name, **options):
    """Every level finished without training: random free weights, then
    `finish_level` keeps each level's share of channels."""
    return finish_levels(
        elsa_tf.embed(
            MODELS[name](),
            SPARSITIES,
            granularity="channel",
            selection="per_layer",
            **options,
        )
    )


def inputs(model, n=8, seed=2):
    shape = (n, *model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def tensor_details(path) -> list[dict]:
    return Interpreter(model_path=str(path)).get_tensor_details()


def tensor_shapes(path) -> dict[str, tuple]:
    """Every tensor of a `.tflite` file's graph, by name, with its shape."""
    return {d["name"]: tuple(int(s) for s in d["shape"]) for d in tensor_details(path)}


def close(got, want, tolerance):
    scale = max(float(np.abs(want).max()), 1e-6)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= tolerance * scale


@pytest.mark.parametrize("name", ["conv_bn", "mlp"])
def test_levels_are_narrower_files_that_compute_the_level(name, tmp_path):
    model = embedded(name)
    manifest = elsa_tf.export_tflite(model, tmp_path / "out")
    rows = manifest["levels"]
    dense = tmp_path / "out" / rows[-1]["file"]
    dense_shapes = tensor_shapes(dense)
    x = inputs(model.inner_model)
    wants = []
    for level, row in enumerate(rows):
        path = tmp_path / "out" / row["file"]
        small = elsa_tf.extract(model, level, physical=True)
        assert row["parameters"] == small.count_params()
        got = lite.runtime.predict(lite.runtime.interpreter(path.read_bytes()), x)
        wants.append(keras.ops.convert_to_numpy(elsa_tf.extract(model, level)(x)))
        close(got, wants[-1], TOLERANCE[None])
        if level == len(rows) - 1:
            continue
        assert row["bytes"] < rows[-1]["bytes"]
        assert row["parameters"] < rows[-1]["parameters"]
        # The same graph, tensor by tensor, no tensor wider than the dense
        # level's and some narrower: every narrowed width is some tensor's
        # last dimension.
        shapes = tensor_shapes(path)
        shared = set(shapes) & set(dense_shapes)
        assert len(shared) >= len(shapes) - 2  # Constants may merge or split.
        narrower = 0
        for tensor in shared:
            a, b = shapes[tensor], dense_shapes[tensor]
            assert len(a) == len(b) and all(i <= j for i, j in zip(a, b)), tensor
            narrower += a != b
        assert narrower > 0
        last = {shape[-1] for shape in shapes.values() if shape}
        dropped = {
            layer: width
            for layer, width in row["widths"].items()
            if width < rows[-1]["widths"][layer]
        }
        assert dropped and set(dropped.values()) <= last
        assert sum(map(np.prod, shapes.values())) < sum(
            map(np.prod, dense_shapes.values())
        )
    # Not vacuous: the levels compute different things.
    assert np.abs(wants[0] - wants[-1]).max() > 1e-2 * np.abs(wants[-1]).max()


@pytest.mark.parametrize("sparsifier", sparsifiers.NAMES)
def test_every_sparsifier_exports_narrower_levels(sparsifier, tmp_path):
    # export_tflite checks each file against the Keras level, and raises if
    # one differs.
    model = embedded("conv_bn", sparsifier=sparsifier)
    rows = elsa_tf.export_tflite(model, tmp_path / "out")["levels"]
    assert [r["widths"] for r in rows] == [
        {"c1": 4, "c2": 4, "fc": 3},
        {"c1": 8, "c2": 8, "fc": 3},
    ]


def test_the_manifest_describes_files_and_bundle(tmp_path):
    model = embedded("conv_bn")
    x, y = inputs(model.inner_model, 32), np.arange(32) % 3
    manifest = elsa_tf.export_tflite(
        model, tmp_path / "out", sparse_encoding=True, evaluation_data=(x, y)
    )
    assert "bundle_note" not in manifest
    bundle = manifest["bundle"]
    assert bundle["format"] == "elsa_tf.channel_bundle"
    assert (tmp_path / "out" / export.BUNDLE_FILE).stat().st_size == bundle["bytes"]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest
    rows = manifest["levels"]
    assert [r["made_by"] for r in rows] == ["converted", "converted"]
    assert [r["patch_fallback"] for r in rows] == ["narrowed", None]
    assert "narrowed" in export.PATCH_FALLBACKS
    # Nothing to store sparse: a narrowed level has no pruned zeros.
    assert [r["storage_reason"] for r in rows] == ["narrowed", "narrowed"]
    assert "narrowed" in export.STORAGE_REASONS
    assert not any(r["sparse_encoding"] for r in rows)
    assert [r["kept_channels"] for r in rows] == [8, 16]
    assert all(r["total_channels"] == 16 for r in rows)
    assert [r["widths"] for r in rows] == [
        {"c1": 4, "c2": 4, "fc": 3},
        {"c1": 8, "c2": 8, "fc": 3},
    ]
    for row in rows:
        content = (tmp_path / "out" / row["file"]).read_bytes()
        assert row["sha256"] == export._sha256(content)
        assert row["bytes"] == row["dense_bytes"] == len(content)
        assert 0.0 <= row["accuracy"] <= 1.0
    # The device side loads each level from its own file, or makes it from
    # the bundle.
    runner = lite.LevelRunner(tmp_path / "out")
    for level in (0, 1):
        want = keras.ops.convert_to_numpy(elsa_tf.extract(model, level)(x))
        close(runner.load(level).run(x), want, TOLERANCE[None])
        close(runner.load(level, source="bundle").run(x), want, TOLERANCE[None])
    # bundle=False writes no bundle entry, as for other models.
    manifest = elsa_tf.export_tflite(model, tmp_path / "plain", bundle=False)
    assert "bundle" not in manifest and "bundle_note" not in manifest


# The weight type each quantization stores (for "int8", of c2's kernel).
STORED = {"float16": np.float16, "dynamic": np.int8, "int8": np.int8}


@pytest.mark.parametrize("quantization", sorted(STORED))
def test_quantized_levels_are_narrower(quantization, tmp_path):
    model = embedded("wide_conv_bn")
    x = inputs(model.inner_model, 32)
    manifest = elsa_tf.export_tflite(
        model, tmp_path / "out", quantization=quantization, representative_data=x
    )
    rows = manifest["levels"]
    assert manifest["bundle"]["levels"] == [0, 1], manifest.get("bundle_note")
    assert [r["quantization"] for r in rows] == [quantization] * 2
    assert rows[0]["bytes"] < rows[1]["bytes"]
    for level, row in enumerate(rows):
        path = tmp_path / "out" / row["file"]
        # The 4-D tensors: the input, feature maps and convolution kernels,
        # none wider than the level's convolutions.
        maps = [d for d in tensor_details(path) if len(d["shape"]) == 4]
        assert STORED[quantization] in {d["dtype"] for d in maps}
        widest = max(d["shape"][-1] for d in maps)
        assert widest == row["widths"]["c1"] == row["widths"]["c2"]
        content = path.read_bytes()
        got = lite.runtime.predict(lite.runtime.interpreter(content), x)
        want = keras.ops.convert_to_numpy(elsa_tf.extract(model, level)(x))
        close(got, want, TOLERANCE[quantization])


def test_a_file_that_differs_from_keras_raises_and_writes_nothing(
    tmp_path, monkeypatch
):
    model = embedded("mlp")
    real = export._keras_outputs

    def shifted(model, level, probe):
        return [o + 1.0 for o in real(model, level, probe)]

    monkeypatch.setattr(export, "_keras_outputs", shifted)
    with pytest.raises(
        RuntimeError, match=r"level0_sparsity0\.50\.tflite \(level 0, physically"
    ):
        elsa_tf.export_tflite(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
