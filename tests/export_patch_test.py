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


def test_a_buffer_of_one_element_slices_matches_only_an_unscaled_copy():
    # A scale per element would make any bias buffer hold any kernel of its
    # size (MobileNetV2's 144-channel biases and 3x3x16x1 depthwise kernels).
    kernel = _weight((3, 3, 16, 1))
    assert export_patch._match(_weight(144, seed=7), kernel) is None
    assert export_patch._match(kernel.reshape(-1).copy(), kernel) is not None
    assert export_patch._match(_weight((1, 144), seed=7), kernel) is None
    # One scale for the whole buffer still fits.
    assert export_patch._match(kernel.reshape(1, 144) * 2, kernel) is not None


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


# -- weights that differ between levels other than by zeroed elements --------


def test_batch_norm_scale_and_folded_shift_by_hand():
    gamma, variance, epsilon = np.array([2.0, 6.0]), np.array([3.0, 8.0]), 1.0
    # sqrt(variance + 1) = [2, 3].
    np.testing.assert_allclose(
        export_patch.batch_norm_scale(gamma, variance, epsilon), [1.0, 2.0]
    )
    np.testing.assert_allclose(
        export_patch.batch_norm_scale(None, variance, epsilon), [0.5, 1 / 3]
    )
    mean, beta, bias = np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([3, 1])
    # (bias - mean) * s + beta = [2 * 1 + 0, 1 * 2 + 1].
    np.testing.assert_allclose(
        export_patch.folded_shift(bias, gamma, beta, mean, variance, epsilon), [2, 3]
    )
    # Without a layer bias: beta - mean * s; without beta: - mean * s.
    np.testing.assert_allclose(
        export_patch.folded_shift(None, gamma, beta, mean, variance, epsilon), [-1, 1]
    )
    np.testing.assert_allclose(
        export_patch.folded_shift(None, gamma, None, mean, variance, epsilon), [-1, 0]
    )


def test_fold_scales_the_channels_the_axes_enumerate():
    dense = np.array([[1.0, 2.0], [3.0, 4.0]])  # [in, out]
    np.testing.assert_array_equal(
        export_patch.fold(dense, np.array([1.0, 0.5]), (1, 2)), [[1, 1], [3, 2]]
    )
    depthwise = np.ones((1, 1, 2, 2))  # [h, w, channel, multiplier]
    folded = export_patch.fold(depthwise, np.array([1.0, 2.0, 3.0, 4.0]), (2, 4))
    np.testing.assert_array_equal(folded[0, 0], [[1, 2], [3, 4]])


def _factors_along(shape, scale, axes):
    """Per element of a kernel of `shape`, the scale of its channel."""
    return export_patch.fold(np.ones(shape), scale, axes)


@pytest.mark.parametrize(
    "shape, axes",
    [
        ((3, 2), (1, 2)),  # Dense [in, out].
        ((3, 3, 1, 2), (3, 4)),  # Conv2D HWIO.
        ((3, 3, 2, 2), (2, 4)),  # DepthwiseConv2D: channel * multiplier.
        ((3, 3, 2, 5), (2, 3)),  # Conv2DTranspose HWOI.
    ],
)
def test_channel_axes_are_read_from_the_factors(shape, axes):
    scale = np.array([0.5, 2.0, 1.5, 3.0])[: np.prod(shape[axes[0] : axes[1]])]
    factors = _factors_along(shape, scale, axes)
    assert export_patch.channel_axes(factors, scale, 1e-5) == axes
    # A channel whose kernel slice is all zero has no known factor.
    factors = factors.copy()
    factors[..., 0] = np.nan
    assert export_patch.channel_axes(factors, scale, 1e-5) == axes
    assert export_patch.channel_axes(factors, scale[::-1], 1e-5) is None


def test_channel_axes_decline_factors_that_fit_two_ways():
    # A constant scale fits both axes of a square kernel.
    assert (
        export_patch.channel_axes(np.full((2, 2), 0.7), np.full(2, 0.7), 1e-5) is None
    )
    assert export_patch.channel_axes(np.full((2, 2), np.nan), np.ones(2), 1e-5) is None


def test_pair_batch_norm_names_exactly_one_normalization():
    s = np.array([1.0, 0.5])
    factors = _factors_along((3, 2), s, (1, 2))
    other = np.array([2.0, 3.0])
    assert export_patch.pair_batch_norm(factors, [other, s], 1e-5) == ([1], (1, 2))
    assert export_patch.pair_batch_norm(factors, [other], 1e-5) == ([], None)
    # Two normalizations with the same scale: which one is ambiguous.
    assert export_patch.pair_batch_norm(factors, [s, s.copy()], 1e-5) == ([0, 1], None)
    # A constant scale could be any constant the converter folded in.
    flat = np.full(2, 0.7)
    flat_factors = _factors_along((3, 2), flat, (1, 2))
    assert export_patch.pair_batch_norm(flat_factors, [flat], 1e-5) == ([0], None)


def test_pair_batch_norm_takes_the_one_the_graph_says_if_it_fits():
    s, other = np.array([1.0, 0.5]), np.array([2.0, 3.0])
    factors = _factors_along((3, 2), s, (1, 2))
    pair = export_patch.pair_batch_norm
    assert pair(factors, [s, s.copy()], 1e-5, follows=1) == ([0, 1], (1, 2))
    flat = np.full(2, 0.7)
    assert pair(_factors_along((3, 2), flat, (1, 2)), [flat], 1e-5, 0) == (
        [0],
        (1, 2),
    )
    # The graph says the layer feeds normalization 0, whose scale the kernel
    # does not hold: the converter folded in nothing it could have.
    assert pair(factors, [other, s], 1e-5, follows=0) == ([1], None)


def _read(content, index):
    """Buffer `index` of a `_flatbuffer_with` file (index 0 is the first
    array), as float32."""
    from elsa_tf.lite import _flatbuffer as fb

    ref = fb.read_model(content).buffers[index + 1]
    return np.frombuffer(content, np.float32, ref.size // 4, ref.start)


def _folded_dense():
    """Two levels of Dense(3 -> 2, bias) followed by BatchNormalization
    (epsilon 1), every value picked so that folding is done by hand."""
    values = {
        # Level 0 keeps the kernel's elements of level code 0.
        "kernel": (
            np.array([[1, 0], [0, 4], [5, 0]], np.float32),
            np.array([[1, 2], [3, 4], [5, 6]], np.float32),
        ),
        "bias": (np.array([2, 2], np.float32), np.array([3, 1], np.float32)),
        # sqrt(variance + 1): [4, 2] at level 0, [2, 3] at level 1, so the
        # scales are gamma / that: [1, 3] and [1, 2].
        "gamma": (np.array([4, 6], np.float32), np.array([2, 6], np.float32)),
        "variance": (np.array([15, 3], np.float32), np.array([3, 8], np.float32)),
        "mean": (np.array([2, 1], np.float32), np.array([1, 0], np.float32)),
        "beta": (np.array([1, 0], np.float32), np.array([0, 1], np.float32)),
    }
    norm = export_patch.BatchNorm("mean", "variance", "gamma", "beta", epsilon=1.0)
    # What the converter writes for the densest level: FULLY_CONNECTED's
    # [out, in] kernel times the scale per output, and (b - mean) * s + beta.
    kernel = np.array([[1, 3, 5], [4, 8, 12]], np.float32)
    bias = np.array([2, 3], np.float32)  # [(3 - 1) * 1 + 0, (1 - 0) * 2 + 1]
    unrelated = np.array([7, -7, 9], np.float32)
    return values, norm, [kernel, bias, unrelated]


def test_a_folded_batch_norm_is_rewritten_per_level_by_hand():
    values, norm, arrays = _folded_dense()
    content = _flatbuffer_with(arrays)
    varying = ["bias", "gamma", "variance", "mean", "beta"]
    writes, unplaced = export_patch.plan_writes(
        content, values, varying, [export_patch.Layer("kernel", "bias")], [norm]
    )
    assert unplaced == [] and [w.tensor for w in writes] == ["t0", "t1"]
    level0 = export_patch.patch(content, [], 0, writes)
    assert len(level0) == len(content)
    # Level 0: scale [1, 3]; kernel [[1, 0], [0, 4], [5, 0]] times it, as
    # [out, in]; bias [(2 - 2) * 1 + 1, (2 - 1) * 3 + 0].
    np.testing.assert_array_equal(_read(level0, 0), [1, 0, 5, 0, 12, 0])
    np.testing.assert_array_equal(_read(level0, 1), [1, 3])
    np.testing.assert_array_equal(_read(level0, 2), arrays[2])
    level1 = export_patch.patch(content, [], 1, writes)
    np.testing.assert_array_equal(_read(level1, 0), arrays[0].reshape(-1))
    np.testing.assert_array_equal(_read(level1, 1), arrays[1])


def test_a_folded_batch_norm_that_is_ambiguous_is_declined():
    values, norm, arrays = _folded_dense()
    # A second normalization with the same densest scale, other statistics.
    values = {
        **values,
        "mean2": (np.zeros(2), np.ones(2)),
        "gamma2": values["gamma"],
        "variance2": values["variance"],
    }
    twin = export_patch.BatchNorm("mean2", "variance2", "gamma2", epsilon=1.0)
    content = _flatbuffer_with(arrays)
    varying = ["bias", "gamma", "variance", "mean", "beta", "mean2", "gamma2"]
    layers = [export_patch.Layer("kernel", "bias")]
    writes, unplaced = export_patch.plan_writes(
        content, values, varying, layers, [norm, twin]
    )
    assert unplaced == sorted(varying)  # The bias is only found folded.
    # Where the model's graph says which one takes the layer's output, that.
    follows = [export_patch.Layer("kernel", "bias", follows=0)]
    writes, unplaced = export_patch.plan_writes(
        content, values, varying, follows, [norm, twin]
    )
    assert unplaced == ["gamma2", "mean2"]  # The twin is in no buffer.
    assert [w.tensor for w in writes] == ["t0", "t1"]
    # Alone, the first one is placed.
    assert (
        export_patch.plan_writes(content, values, varying[:5], layers, [norm])[1] == []
    )
    # Folded into the kernel, and its scale [1, 2] on its own elsewhere too
    # (a layer called twice): one of the two would be left as it is.
    twice = _flatbuffer_with([*arrays, np.array([1, 2], np.float32)])
    assert export_patch.plan_writes(twice, values, varying[:5], layers, [norm]) == (
        [],
        sorted(varying[:5]),
    )


def test_a_batch_norm_folded_into_the_next_layer_is_declined():
    # BatchNormalization(2) -> Dense(2 -> 2): the converter scales the
    # kernel per input, which reproduces the kernel's buffer, and moves the
    # shift into the bias through the kernel: b + (beta - mean * s) @ kernel
    # is not (b - mean) * s + beta, so nothing is placed.
    values, norm, _ = _folded_dense()
    kernel = np.array([[1, 2], [3, 4]], np.float32)  # [in, out]
    bias = np.array([1, 2], np.float32)
    values = {**values, "kernel": (kernel, kernel), "bias": (bias, bias)}
    s, shift = np.array([1, 2], np.float32), np.array([-1, 1], np.float32)
    content = _flatbuffer_with([(kernel * s[:, None]).T.copy(), bias + shift @ kernel])
    layers = [export_patch.Layer("kernel", "bias")]
    varying = ["beta", "gamma", "mean", "variance"]
    assert export_patch.plan_writes(content, values, varying, layers, [norm]) == (
        [],
        varying,
    )


def test_weights_stored_as_they_are_and_a_lone_batch_norm_are_rewritten():
    values, norm, _ = _folded_dense()
    gamma = (
        np.array([0.5, 1.5, 2.0], np.float32),
        np.array([1.0, 2.0, 3.0], np.float32),
    )
    values = {**values, "ln/gamma": gamma}
    # A LayerNormalization's scale, reshaped to broadcast; the normalization
    # as a multiplication by s = [1, 2] and an addition of beta - mean * s.
    arrays = [
        gamma[1].reshape(1, 3),
        np.array([1, 2], np.float32),
        np.array([-1, 1], np.float32),
    ]
    content = _flatbuffer_with(arrays)
    varying = ["ln/gamma", "gamma", "variance", "mean", "beta"]
    writes, unplaced = export_patch.plan_writes(content, values, varying, [], [norm])
    assert unplaced == [] and [w.tensor for w in writes] == ["t0", "t1", "t2"]
    level0 = export_patch.patch(content, [], 0, writes)
    np.testing.assert_array_equal(_read(level0, 0), gamma[0])
    np.testing.assert_array_equal(_read(level0, 1), [1, 3])  # s at level 0
    np.testing.assert_array_equal(_read(level0, 2), [-1, -3])  # 1 - 2 * 1, 0 - 1 * 3


def test_constants_and_buffers_two_weights_claim_are_declined():
    a = (np.array([1, 2, 3], np.float32), np.array([4, 5, 6], np.float32))
    b = (np.array([0, 0, 1], np.float32), np.array([4, 5, 6], np.float32))
    zeros = (np.ones(3, np.float32), np.zeros(3, np.float32))
    content = _flatbuffer_with([a[1], np.zeros(3, np.float32)])
    values = {"a": a, "b": b, "zeros": zeros}
    assert export_patch.plan_writes(content, values, ["a"])[1] == []
    # Same densest values, other values at level 0: which is the buffer?
    assert export_patch.plan_writes(content, values, ["a", "b"]) == ([], ["a", "b"])
    # A constant could be any constant the converter made.
    assert export_patch.plan_writes(content, values, ["zeros"]) == ([], ["zeros"])


def test_a_write_must_zero_what_a_patch_zeroes():
    codes = np.array([0, 1, 0], np.uint8)
    patches = [export_patch.BufferPatch(1, "t0", np.dtype("float32"), codes)]
    level0 = np.array([1, 0, 2], np.float32)
    dense = np.array([1, 5, 2], np.float32)
    ok = export_patch.BufferWrite(1, "t0", np.dtype("float32"), (level0, dense))
    assert export_patch.consistent(patches, [ok])
    wrong = export_patch.BufferWrite(1, "t0", np.dtype("float32"), (dense, dense))
    assert not export_patch.consistent(patches, [wrong])
