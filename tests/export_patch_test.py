"""export_patch: level codes, finding a weight in a buffer, patching in place."""

import numpy as np
import pytest

from elsa_tf import export_patch


def _levels(base, codes, num):
    return [np.where(codes <= k, base, 0).astype(base.dtype) for k in range(num)]


def test_level_codes_are_the_first_level_using_each_element():
    base = np.array([[1.0, -2.0, 3.0], [0.0, 5.0, 6.0]], np.float32)
    codes = np.array([[0, 2, 1], [3, 1, 2]], np.uint8)  # 3: no level uses it.
    np.testing.assert_array_equal(
        export_patch.level_codes(_levels(base, codes, 3)), codes
    )


def test_level_codes_reject_levels_that_are_not_masked_copies():
    base = np.array([1.0, 2.0, 3.0], np.float32)
    other = np.array([1.0, 2.5, 0.0], np.float32)  # A value changed.
    assert export_patch.level_codes([other, base]) is None
    dropped = [np.array([0.0, 2.0, 0.0]), np.array([1.0, 0.0, 3.0]), base]
    assert export_patch.level_codes(dropped) is None  # Level 0 not in level 1.


def _weight(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32)


def _dense_layouts():
    w = _weight((6, 4))  # Dense [in, out].
    return [
        ("same", w, w),
        ("transposed", w, w.T.copy()),  # FULLY_CONNECTED [out, in].
        ("folded", w, (w * np.linspace(0.5, 2, 4)).T.copy()),  # BN per output.
        ("input_scale", w, w.T * np.linspace(0.5, 2, 6)),  # Per input.
        ("float16", w, w.T.astype(np.float16)),
    ]


@pytest.mark.parametrize("name, weight, buffer", _dense_layouts())
def test_a_buffer_matches_its_weight_in_the_layouts_the_converter_writes(
    name, weight, buffer
):
    buffer = np.ascontiguousarray(buffer, buffer.dtype if name == "float16" else "f4")
    assert export_patch._match(buffer, weight) is not None


def test_conv_kernels_match_as_ohwi_and_einsum_kernels_reshaped():
    hwio = _weight((3, 3, 2, 5))
    ohwi = np.transpose(hwio, (3, 0, 1, 2)) * np.linspace(1, 2, 5)[:, None, None, None]
    assert export_patch._match(ohwi.astype(np.float32), hwio) == (3, 0, 1, 2)
    einsum = _weight((8, 2, 4))  # (hidden, heads, head_dim) -> FC [out, in].
    fc = np.ascontiguousarray(np.transpose(einsum, (1, 2, 0)).reshape(8, 8))
    assert export_patch._match(fc, einsum) == (1, 2, 0)


def test_other_buffers_do_not_match():
    w = _weight((6, 4))
    assert export_patch._match(_weight((4, 6), seed=1), w) is None
    assert export_patch._match(np.zeros((4, 6), np.float32), w) is None
    assert export_patch._match(w.T**2, w) is None  # Not a per-slice scale.
    assert export_patch._match(w.T + 1, w) is None
    scaled_twice = w.T * np.linspace(1, 2, 4)[:, None] * np.linspace(1, 2, 6)
    assert export_patch._match(scaled_twice.astype(np.float32), w) is None
    # A scale of zero may zero a whole slice, but a nonzero where the weight
    # is zero never matches.
    zero_row = w.T.copy()
    zero_row[1] = 0
    assert export_patch._match(zero_row, w) is not None
    zero_inside = w.copy()
    zero_inside[1, 1] = 0
    assert export_patch._match(w.T.copy(), zero_inside) is None


def _flatbuffer_with(arrays):
    """A tiny `.tflite` holding `arrays` as constant tensors, built with the
    schema's object API (TensorFlow's own flatbuffer tools)."""
    flatbuffers = pytest.importorskip("flatbuffers")
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT()
    model.version = 3
    model.buffers = [schema.BufferT()]
    subgraph = schema.SubGraphT()
    subgraph.tensors, subgraph.inputs, subgraph.outputs = [], [], []
    subgraph.operators = []
    for i, array in enumerate(arrays):
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(array.tobytes(), np.uint8)
        model.buffers.append(buffer)
        tensor = schema.TensorT()
        tensor.shape = list(array.shape)
        tensor.type = {np.float32: 0, np.float16: 1}[array.dtype.type]
        tensor.buffer = i + 1
        tensor.name = f"t{i}".encode()
        subgraph.tensors.append(tensor)
    model.subgraphs = [subgraph]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_find_buffers_and_patch_zero_exactly_the_levels_dropped_weights():
    w = _weight((6, 4))
    codes = np.random.default_rng(2).integers(0, 3, size=w.shape).astype(np.uint8)
    tied = _weight((5, 3), seed=3)
    tied_codes = np.random.default_rng(4).integers(0, 2, size=tied.shape)
    folded = (w * np.linspace(1, 2, 4)).T.astype(np.float32)
    content = _flatbuffer_with([folded, np.ones(3, np.float32), tied, tied.T.copy()])
    weights = [
        export_patch.Weight("w", w, codes),
        export_patch.Weight("tied", tied, tied_codes.astype(np.uint8)),
    ]
    patches, missing = export_patch.find_buffers(content, weights)
    assert missing == [] and [p.tensor for p in patches] == ["t0", "t2", "t3"]
    from elsa_tf.lite import _flatbuffer as fb

    ref = fb.read_model(content)
    for level in range(3):
        out = export_patch.patch(content, patches, level)
        assert len(out) == len(content)

        def read(i, data=out):
            b = ref.buffers[i + 1]
            return np.frombuffer(data, np.float32, b.size // 4, b.start)

        np.testing.assert_array_equal(read(0) == 0, (codes > level).T.reshape(-1))
        np.testing.assert_array_equal(read(1), np.ones(3))
        np.testing.assert_array_equal(read(2) == 0, (tied_codes > level).reshape(-1))
        np.testing.assert_array_equal(read(3) == 0, (tied_codes > level).T.reshape(-1))


def test_a_weight_in_no_buffer_is_reported():
    content = _flatbuffer_with([_weight((4, 6), seed=5)])
    w = _weight((6, 4))
    weights = [export_patch.Weight("dense/kernel", w, np.zeros(w.shape, np.uint8))]
    assert export_patch.find_buffers(content, weights) == ([], ["dense/kernel"])
