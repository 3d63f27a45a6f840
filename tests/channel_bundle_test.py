"""The channel bundle: every channel level made on the device from one file.

`export_tflite` writes a channel bundle for a model embedded with
`granularity="channel"` (`elsa_tf.export_channels`); `elsa_tf.lite` makes each
level's narrower flatbuffer from it without TensorFlow
(`elsa_tf.lite.channel_bundle`), rewriting tensor shapes, quantization and
options and slicing the densest weights. Each level made must be the
level's own file as a model and compute its outputs within 1e-5; a truncated
or bit-flipped bundle must raise `BundleError` or give the right bytes.
"""

import json

import keras
import numpy as np
import pytest
from conftest import finish_levels
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

import elsa_tf
from elsa_tf import export, export_channels, lite
from elsa_tf.lite import _flatbuffer as fb
from elsa_tf.lite import _pairing, channel_bundle

L = keras.layers
SPARSITIES = [0.75, 0.5, 0.0]
# The bound, of the largest output (at least 1).
TOLERANCE = 1e-5


def conv_bn(width=8):
    """Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> GAP -> Dense 6 -> Dense 3,
    both convolutions `width` wide."""
    inputs = keras.Input((8, 8, 1), name="x")
    h = L.Conv2D(width, 3, padding="same", name="c1")(inputs)
    h = L.ReLU(name="r1")(L.BatchNormalization(name="bn1")(h))
    h = L.Conv2D(width, 3, padding="same", name="c2")(h)
    h = L.ReLU(name="r2")(L.BatchNormalization(name="bn2")(h))
    h = L.Dense(6, activation="relu", name="d1")(L.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, L.Dense(3, name="fc")(h), name="conv_bn")


def residual():
    """A residual block (the addition couples c0's and c2's channels), then
    a Reshape into a Dense layer, which keeps whole spatial runs."""
    inputs = keras.Input((8, 8, 2), name="x")
    h = L.Conv2D(8, 3, padding="same", name="c0")(inputs)
    h = L.ReLU()(L.BatchNormalization(name="bn0")(h))
    s = L.Conv2D(8, 3, padding="same", name="c1")(h)
    s = L.ReLU()(L.BatchNormalization(name="bn1")(s))
    s = L.BatchNormalization(name="bn2")(L.Conv2D(8, 3, padding="same", name="c2")(s))
    h = L.ReLU()(L.Add()([h, s]))
    h = L.Reshape((32,))(L.MaxPooling2D(4)(h))
    out = L.Dense(3, name="fc")(L.Dense(6, activation="relu", name="d1")(h))
    return keras.Model(inputs, out, name="residual")


def attention():
    """Dense 12 -> self-attention of 8 heads of 3, added back -> Dense 16 ->
    average over the 6 positions -> Dense 3: the levels drop heads too.

    The widths differ from each other at every level: the converter stores
    equal constants once, and a Dense layer on a sequence reads its width as
    a constant, so two equal widths would merge two tensors in a level's
    file and leave no bundle (see `test_unsupported_levels_leave_a_note`).
    """
    inputs = keras.Input((6, 4), name="x")
    h = L.Dense(12, name="embed")(inputs)
    h = L.Add()([h, L.MultiHeadAttention(8, 3, name="mha")(h, h)])
    h = L.Dense(16, activation="relu", name="ff")(h)
    h = L.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, L.Dense(3, name="fc")(h), name="attention")


MODELS = {
    "conv_bn": conv_bn,
    "residual": residual,
    "attention": attention,
    # The converter quantizes weights of 1024 elements or more only: c2's
    # kernel is 9 x 32 x 32.
    "wide_conv_bn": lambda: conv_bn(32),
}


def embedded(name, sparsities=SPARSITIES):
    model = MODELS[name]()
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, w.shape).astype("float32")
                    for w in layer.weights
                ]
            )
    return finish_levels(
        elsa_tf.embed(model, sparsities, granularity="channel", selection="per_layer")
    )


def inputs(model, n=16, seed=3):
    shape = (n, *model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> (model, export directory, manifest), each exported once."""
    made = {}

    def get(name):
        if name not in made:
            model = embedded(name)
            out = tmp_path_factory.mktemp(name) / "out"
            made[name] = model, out, elsa_tf.export_tflite(model, out)
        return made[name]

    return get


@pytest.fixture(params=["conv_bn", "residual", "attention"])
def exported(request, exports):
    return exports(request.param)


def run(content: bytes, x: np.ndarray) -> np.ndarray:
    return lite.runtime.predict(lite.runtime.interpreter(content), x)


def shapes(content: bytes) -> list[tuple]:
    return [tuple(t.shape) for t in fb.read_model(content).tensors]


def paired_shapes(made: bytes, own: bytes) -> list[tuple]:
    """The shapes of `made`'s tensors in `own`'s order: a level made from
    the bundle keeps the bundle's numbering (`lite._pairing`)."""
    mapping = _pairing.pair_tensors(
        fb.read_model(made),
        fb.read_model(own),
        fb.read_operators(made),
        fb.read_operators(own),
    )
    found = {index: shapes(made)[i] for (_, i), index in mapping.items()}
    return [found.get(i) for i in range(len(shapes(own)))]


def test_every_level_made_from_the_bundle_is_its_file(exported):
    model, out, manifest = exported
    rows = manifest["levels"]
    path = out / export.BUNDLE_FILE
    x = inputs(model.inner_model)
    bundle = lite.read_bundle(path, expected_sha256=manifest["bundle"]["sha256"])
    assert isinstance(bundle, lite.ChannelBundle)
    assert bundle.levels == [0, 1, 2]
    outputs = []
    for level, row in enumerate(rows):
        own = (out / row["file"]).read_bytes()
        made = lite.materialize(path, level)
        # The narrower network: every tensor has the level's shape.
        assert paired_shapes(made, own) == shapes(own)
        got, want = run(made, x), run(own, x)
        scale = max(float(np.abs(want).max()), 1.0)
        assert np.abs(got - want).max() <= TOLERANCE * scale
        # Not vacuous: the files differ from the densest where it counts.
        if level < len(rows) - 1:
            assert shapes(own) != shapes((out / rows[-1]["file"]).read_bytes())
        outputs.append(want)
        # The level made is not a bundle any more.
        with pytest.raises(lite.BundleError, match="made from a channel bundle"):
            lite.read_bundle(made)
    assert np.abs(outputs[0] - outputs[-1]).max() > 1e-2 * np.abs(outputs[-1]).max()
    # The runner makes the same levels.
    runner = lite.LevelRunner(out)
    for level in range(len(rows)):
        np.testing.assert_array_equal(
            runner.load(level, source="bundle").run(x),
            run(bundle.materialize(level), x),
        )


def test_the_manifest_records_the_bundle_beside_the_files(exported):
    model, out, manifest = exported
    entry, rows = manifest["bundle"], manifest["levels"]
    content = (out / export.BUNDLE_FILE).read_bytes()
    assert "bundle_note" not in manifest
    assert entry["file"] == export.BUNDLE_FILE
    assert entry["format"] == channel_bundle.METADATA_NAME
    assert entry["bytes"] == len(content)
    assert entry["sha256"] == export._sha256(content)
    assert entry["levels"] == [0, 1, 2]
    assert entry["level_files_bytes"] == sum(r["bytes"] for r in rows)
    assert entry["densest_bytes"] == rows[-1]["bytes"]
    # Smaller than every level's file together; more than the densest.
    assert entry["densest_bytes"] < entry["bytes"] < entry["level_files_bytes"]
    assert entry["vector_edits"] > 0 and entry["sliced_buffers"] > 0
    assert entry["max_abs_difference"] <= TOLERANCE * 100
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest


def buffer_of(content: bytes, index: int, dtype) -> np.ndarray:
    ref = fb.read_model(content).buffers[index]
    return np.frombuffer(
        content, dtype, ref.size // np.dtype(dtype).itemsize, ref.start
    )


@pytest.mark.parametrize("name", ["conv_bn", "residual"])  # With BatchNormalization.
def test_folded_per_level_statistics_are_scaled_slices(name, exports):
    # shared="per_level_statistics" (the default for channels) folds each
    # level's own statistics into its kernels: not slices of the densest
    # kernels, but slices scaled per output channel.
    _, out, manifest = exports(name)
    assert manifest["bundle"]["scaled_buffers"] > 0
    assert manifest["bundle"]["exact"] is False
    bundle = lite.read_bundle(out / export.BUNDLE_FILE)
    for level, edits in enumerate(bundle.edits()):
        own = (out / manifest["levels"][level]["file"]).read_bytes()
        made = bundle.materialize(level)
        for edit in (e for e in edits if "scale" in e):
            want = buffer_of(own, edit["buffer"], np.float32)
            weights = buffer_of(bundle.data, edit["buffer"], np.float32)
            takes = [(a, bundle._array(i, "<i4")) for a, i in edit["take"]]
            sliced = channel_bundle._rebuild(
                weights.reshape(edit["shape"]), takes, None
            )
            assert not np.array_equal(sliced.ravel(), want)  # Not a plain slice.
            got = buffer_of(made, edit["buffer"], np.float32)
            limit = channel_bundle.SCALE_TOLERANCE * np.abs(want).max()
            assert np.abs(got - want).max() <= limit


@pytest.mark.parametrize("quantization", ["dynamic", "float16", "int8"])
def test_quantized_channel_levels(quantization, tmp_path):
    model = embedded("wide_conv_bn", [0.5, 0.0])  # c2's kernel: 9 x 16 x 16.
    x = inputs(model.inner_model, 32)
    manifest = elsa_tf.export_tflite(
        model, tmp_path, quantization=quantization, representative_data=x
    )
    assert manifest["bundle"] is not None, manifest.get("bundle_note")
    bundle = lite.read_bundle(tmp_path / export.BUNDLE_FILE)
    for row in manifest["levels"]:
        got = run(bundle.materialize(row["level"]), x)
        want = run((tmp_path / row["file"]).read_bytes(), x)
        assert np.abs(got - want).max() <= TOLERANCE * max(np.abs(want).max(), 1)
    edits = [e for level_edits in bundle.edits() for e in level_edits]
    # A per-channel scale is for float32 weights only: a quantized kernel is
    # sliced as it is or stored (int8 kernels get their own per-channel
    # scales, which a narrower input changes), and its quantization scales,
    # where per channel, are rewritten.
    assert all(e["dtype"] == "<f4" for e in edits if "scale" in e)
    if quantization != "float16":
        assert any(e.get("vector", [None])[-1] == "scale" for e in edits)


# Options that carry widths. This converter computes a Reshape's shape at run
# time, so a file whose Reshape states `new_shape` is made here.


def with_reshape_options(content: bytes, new_shape) -> bytes:
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    codes = [c.builtinCode for c in model.operatorCodes]
    (op,) = [
        o
        for o in model.subgraphs[0].operators
        if codes[o.opcodeIndex] == schema.BuiltinOperator.RESHAPE
    ]
    op.builtinOptionsType = schema.BuiltinOptions.ReshapeOptions
    op.builtinOptions = schema.ReshapeOptionsT()
    op.builtinOptions.newShape = list(new_shape)
    builder = export._aligned_builder(len(content) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_reshape_options_are_rewritten(exports):
    model, out, manifest = exports("residual")
    rows = manifest["levels"]
    widths = [r["widths"]["c0"] * 4 for r in rows]  # 2 x 2 positions.
    files = [
        with_reshape_options((out / r["file"]).read_bytes(), [-1, w])
        for r, w in zip(rows, widths)
    ]
    x = inputs(model.inner_model)
    payload, stats = channel_bundle.encode(
        files, [export_channels.candidates(model, k) for k in range(len(rows))]
    )
    bundle = channel_bundle.read_bundle(export_channels.bundle_file(files[-1], payload))
    for level, own in enumerate(files):
        made = bundle.materialize(level)
        (op,) = [o for o in fb.read_operators(made) if o.options_type == 17]
        ref = fb.locate(made, ("options", 0, op.index, 17, 0))
        assert fb.read_vector(made, ref).tolist() == [-1, widths[level]]
        assert export_channels._same_model(made, own, scaled_of(bundle, level)) is None
        got, want = run(made, x), run(own, x)
        assert np.abs(got - want).max() <= TOLERANCE * max(np.abs(want).max(), 1)
    options = [e for edits in bundle.edits() for e in edits if "vector" in e]
    assert sum(e["vector"][0] == "options" for e in options) == 2


def scaled_of(bundle, level) -> set:
    return {e["buffer"] for e in bundle.edits()[level] if "scale" in e}


# What cannot be a bundle gives none, and says why.


def test_a_level_quantized_otherwise_gives_no_bundle(tmp_path):
    # At 25% of the channels c2's kernel (9 x 8 x 8) is under the 1024
    # weights the converter quantizes: that level's graph keeps a float32
    # kernel where the densest has an int8 one.
    model = embedded("wide_conv_bn")
    x = inputs(model.inner_model, 32)
    manifest = elsa_tf.export_tflite(
        model, tmp_path, quantization="dynamic", representative_data=x
    )
    assert manifest["bundle"] is None
    note = manifest["bundle_note"]
    assert note.startswith("No bundle for these channel levels: Level file 0 is")
    assert "c2_1/convolution') differs in type" in note
    assert note.endswith("Use the per-level files.")
    assert not (tmp_path / export.BUNDLE_FILE).exists()


def test_files_of_another_graph_are_refused(exported, tmp_path):
    model, out, manifest = exported
    rows = manifest["levels"]
    dense = (out / rows[-1]["file"]).read_bytes()
    mlp = keras.Sequential([keras.Input((4,)), L.Dense(2)])
    other = export._convert(export._saved_model(mlp, str(tmp_path)), None, None, False)
    with pytest.raises(channel_bundle.UnsupportedLevels, match="Level file 0 is not"):
        channel_bundle.encode([other, dense])
    if model.inner_model.name == "residual":
        # Options only the level states, and a vector longer than the
        # densest file's: nothing to write them over.
        own = (out / rows[0]["file"]).read_bytes()
        longer = with_reshape_options(own, [-1, 8, 1])
        with pytest.raises(channel_bundle.UnsupportedLevels, match="operator 8 of"):
            channel_bundle.encode([longer, dense])
        dense = with_reshape_options(dense, [-1, 32])
        with pytest.raises(channel_bundle.UnsupportedLevels, match="cannot be written"):
            channel_bundle.encode([longer, dense])


def test_a_bundle_that_would_be_wrong_is_not_written(tmp_path, monkeypatch):
    # A reader that makes wrong buffers (here: one changed exponent each)
    # also records their digests at export; the export's own comparison of
    # every level made with the level's file is what refuses the bundle.
    model = embedded("conv_bn")
    real = channel_bundle.ChannelBundle._buffer_bytes

    def damaged(self, edit):
        made = bytearray(real(self, edit))
        made[3] ^= 0x40
        return bytes(made)

    monkeypatch.setattr(channel_bundle.ChannelBundle, "_buffer_bytes", damaged)
    manifest = elsa_tf.export_tflite(model, tmp_path / "out")
    assert manifest["bundle"] is None
    note = manifest["bundle_note"]
    assert note.startswith(
        "No bundle for these channel levels: level 0 made from it differs at "
    )
    assert not (tmp_path / "out" / export.BUNDLE_FILE).exists()
    assert len(manifest["levels"]) == 3  # The per-level files are written.


def test_unsupported_levels_leave_a_note(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise channel_bundle.UnsupportedLevels("Level file 0 is not the same graph.")

    monkeypatch.setattr(channel_bundle, "encode", refuse)
    manifest = elsa_tf.export_tflite(embedded("conv_bn"), tmp_path / "out")
    assert manifest["bundle"] is None
    assert manifest["bundle_note"] == (
        "No bundle for these channel levels: Level file 0 is not the same graph. "
        "Use the per-level files."
    )


def merged_constants():
    """At level 0 this model has widths of 2 (its Dense layer "ff", its
    heads) where the graph already holds a constant 2: the converter stores
    them once, so the level's file has fewer tensors than the densest."""
    source = keras.Input((6, 4), name="x")
    h = L.Dense(8, name="embed")(source)
    h = L.Add()([h, L.MultiHeadAttention(8, 2, name="mha")(h, h)])
    h = L.GlobalAveragePooling1D()(L.Dense(8, activation="relu", name="ff")(h))
    return keras.Model(source, L.Dense(3, name="fc")(h))


def transformer_block():
    """A transformer block: its stream of 16 (kept whole by the
    normalization) and its feed-forward output of 16, which the levels
    narrow, read one shape constant [16] in the densest file; level 0 must
    give them [16] and [4]."""
    source = keras.Input((10, 6), name="x")
    h = L.Dense(16, name="proj")(source)
    h = L.Add()([h, L.MultiHeadAttention(8, 4, name="mha")(h, h)])
    h = L.LayerNormalization()(h)
    h = L.Dense(16, name="ff2")(L.Dense(32, activation="relu", name="ff1")(h))
    return keras.Model(source, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(h)))


@pytest.mark.parametrize("build", [merged_constants, transformer_block])
def test_constants_the_converter_shares_are_bundled(build, tmp_path):
    model = finish_levels(
        elsa_tf.embed(build(), SPARSITIES, granularity="channel", selection="per_layer")
    )
    out = tmp_path / "out"
    manifest = elsa_tf.export_tflite(model, out)
    assert "bundle_note" not in manifest
    rows = manifest["levels"]
    assert [row["widths"]["mha"] for row in rows] == [2, 4, 8]
    files = [(out / row["file"]).read_bytes() for row in rows]
    base = export_channels.unshare_constants(files[-1])
    # Not vacuous: the converter merged tensors at level 0, or shared one
    # constant between layers that level 0 narrows differently.
    assert len(shapes(files[0])) < len(shapes(files[-1])) or (
        len(shapes(base)) > len(shapes(files[-1]))
    )
    x = inputs(model.inner_model)
    for level, own in enumerate(files):
        made = lite.materialize(out / export.BUNDLE_FILE, level)
        assert len(shapes(made)) == len(shapes(base))
        assert paired_shapes(made, own) == shapes(own)
        got, want = run(made, x), run(own, x)
        assert np.abs(got - want).max() <= TOLERANCE * max(np.abs(want).max(), 1.0)


# Corrupt bundles: a BundleError or the right level, never a wrong model.


@pytest.fixture()
def bundle_bytes(exported):
    _, out, _ = exported
    content = (out / export.BUNDLE_FILE).read_bytes()
    bundle = lite.read_bundle(content)
    return content, [bundle.materialize(k) for k in bundle.levels]


def outcome(content: bytes, level: int, right: bytes) -> str:
    """The outcome of making `level` from `content`: "error" for a
    BundleError, "right" for the right bytes; anything else (another
    exception, other bytes) fails the test."""
    try:
        made = lite.materialize(content, level)
    except lite.BundleError:
        return "error"
    assert made == right, f"a wrong level {level} came back"
    return "right"


def payload_range(content: bytes) -> tuple[int, int]:
    model = fb.read_model(content)
    ref = model.buffers[model.metadata[channel_bundle.METADATA_NAME]]
    return ref.start, ref.start + ref.size


def test_truncated_bundles_raise(bundle_bytes):
    content, made = bundle_bytes
    rng = np.random.default_rng(0)
    start, end = payload_range(content)
    cuts = {0, 4, 8, 100, start, start + 13, end - 1, len(content) - 1}
    cuts |= set(rng.integers(0, len(content), 150).tolist())
    results = [outcome(content[:cut], cut % 3, made[cut % 3]) for cut in sorted(cuts)]
    assert results.count("error") == len(results)


def test_bit_flips_raise_or_give_the_right_level(bundle_bytes):
    content, made = bundle_bytes
    rng = np.random.default_rng(1)
    start, end = payload_range(content)
    # Anywhere in the file, and, as often, in the payload (header and data).
    positions = np.concatenate(
        [rng.integers(0, len(content), 200), rng.integers(start, end, 200)]
    )
    counts = {"error": 0, "right": 0}
    for i, position in enumerate(positions.tolist()):
        corrupt = bytearray(content)
        corrupt[position] ^= 1 << int(rng.integers(8))
        counts[outcome(bytes(corrupt), i % 3, made[i % 3])] += 1
    assert counts["error"] > 300, counts  # Most flips are caught...
    assert sum(counts.values()) == 400  # ...and none gave a wrong level.


def test_a_level_the_bundle_does_not_hold(bundle_bytes):
    content, _ = bundle_bytes
    with pytest.raises(lite.BundleError, match=r"holds levels \[0, 1, 2\]. Received"):
        lite.materialize(content, 3)
    with pytest.raises(TypeError, match="Received: level=1.0"):
        lite.materialize(content, 1.0)
