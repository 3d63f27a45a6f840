"""Channel groups on models small enough to list every member by hand."""

import doctest

import keras
import numpy as np
import pytest

from elsa_tf import channel_members, channels
from elsa_tf.channels import ChannelGroup, Member, channel_groups, member_indices
from elsa_tf.experiments import zoo

L = keras.layers


def M(path, axis, role, offset=0, stride=0, repeat=1):  # noqa: N802
    return Member(path, axis, role, offset, stride, repeat)


# -- hand models: each returns a small Functional or Sequential model ---------------


def conv_bn_conv():
    """conv 3->4 (3x3) -> BN -> ReLU -> conv 4->5 (1x1)."""
    inputs = keras.Input((6, 6, 3), name="x")
    h = L.Conv2D(4, 3, name="c1")(inputs)
    h = L.BatchNormalization(name="bn")(h)
    h = L.ReLU(name="relu")(h)
    return keras.Model(inputs, L.Conv2D(5, 1, name="c2")(h), name="conv_bn_conv")


def depthwise():
    """conv 3->4 -> depthwise 3x3 (+bias) -> BN -> conv 4->2."""
    inputs = keras.Input((6, 6, 3), name="x")
    h = L.Conv2D(4, 1, use_bias=False, name="expand")(inputs)
    h = L.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = L.BatchNormalization(name="dw_bn")(h)
    return keras.Model(inputs, L.Conv2D(2, 1, name="project")(h), name="depthwise")


def residual():
    """Two convs of 4 added (a residual), ReLU, conv 4->2."""
    inputs = keras.Input((5, 5, 3), name="x")
    a = L.Conv2D(4, 1, name="a")(inputs)
    b = L.Conv2D(4, 3, padding="same", name="b")(inputs)
    h = L.ReLU(name="relu")(L.Add(name="add")([a, b]))
    return keras.Model(inputs, L.Conv2D(2, 1, name="out")(h), name="residual")


def concatenate():
    """conv a (2) and conv b (3) concatenated -> BN -> conv 5->2."""
    inputs = keras.Input((5, 5, 3), name="x")
    a = L.Conv2D(2, 1, name="a")(inputs)
    b = L.Conv2D(3, 1, name="b")(inputs)
    h = L.Concatenate(name="cat")([a, b])
    h = L.BatchNormalization(name="bn")(h)
    return keras.Model(inputs, L.Conv2D(2, 1, name="out")(h), name="concatenate")


def flatten_dense():
    """conv 3 filters on 4x4 -> pool to 2x2 -> flatten (12) -> Dense 5 -> 2."""
    inputs = keras.Input((4, 4, 1), name="x")
    h = L.Conv2D(3, 3, padding="same", name="conv")(inputs)
    h = L.MaxPooling2D(name="pool")(h)
    h = L.Flatten(name="flatten")(h)
    h = L.Dense(5, activation="relu", name="fc")(h)
    return keras.Model(inputs, L.Dense(2, name="logits")(h), name="flatten_dense")


def sequential():
    """The same as `flatten_dense`, as a Sequential model (variable paths carry
    the model's name)."""
    return keras.Sequential(
        [
            keras.Input((4, 4, 1)),
            L.Conv2D(3, 3, padding="same", name="conv"),
            L.BatchNormalization(name="bn"),
            L.Flatten(name="flatten"),
            L.Dense(5, activation="relu", name="fc"),
            L.Dense(2, name="logits"),
        ],
        name="sequential",
    )


def reshape():
    """conv 3 -> Reshape to (2, 2*3) -> Dense 4 -> Reshape((-1, 4)) -> Dense 2."""
    inputs = keras.Input((2, 2, 1), name="x")
    h = L.Conv2D(3, 1, name="conv")(inputs)
    h = L.Reshape((2, 6), name="rows")(h)
    h = L.Dense(4, name="fc")(h)
    h = L.Reshape((-1, 4), name="same")(h)
    h = L.Flatten(name="flatten")(h)
    return keras.Model(inputs, L.Dense(2, name="logits")(h), name="reshape")


def shared():
    """One conv (3->3) applied to the outputs of two convs: their groups merge."""
    inputs = keras.Input((4, 4, 2), name="x")
    a = L.Conv2D(3, 1, name="a")(inputs)
    b = L.Conv2D(3, 1, name="b")(inputs)
    tied = L.Conv2D(3, 1, name="tied")
    h = L.Concatenate(name="cat")([tied(a), tied(b)])
    return keras.Model(inputs, L.Conv2D(2, 1, name="out")(h), name="shared")


def attention():
    """Dense 6->4 ("embed"), self-attention of 3 heads of 2 over it, added back
    (a residual), average over positions, Dense 4->2."""
    inputs = keras.Input((5, 6), name="x")
    h = L.Dense(4, name="embed")(inputs)
    h = L.Add(name="add")([h, L.MultiHeadAttention(3, 2, name="mha")(h, h)])
    h = L.GlobalAveragePooling1D(name="pool")(h)
    return keras.Model(inputs, L.Dense(2, name="out")(h), name="attention")


def operations():
    """conv 3->4 -> hard swish written with keras.ops and Python operators
    (`x * relu6(x + 3) / 6`) -> conv 4->2: the operations pass channels
    through, and the product of two tensors merges them."""
    inputs = keras.Input((5, 5, 3), name="x")
    h = L.Conv2D(4, 1, name="c1")(inputs)
    h = h * keras.ops.relu6(h + 3.0) / 6.0
    return keras.Model(inputs, L.Conv2D(2, 1, name="c2")(h), name="operations")


HAND_MODELS = {
    f.__name__: f
    for f in (
        attention,
        operations,
        conv_bn_conv,
        depthwise,
        residual,
        concatenate,
        flatten_dense,
        sequential,
        reshape,
        shared,
    )
}


def by_layer(groups, name):
    """The group whose channels the layer `name` produces or carries first."""
    (group,) = [g for g in groups if g.layers and g.layers[0] == name]
    return group


# -- rules ---------------------------------------------------------------------------


def test_conv_bn_conv_members_exactly():
    groups = channel_groups(conv_bn_conv())
    assert [(g.size, g.layers, g.pinned) for g in groups] == [
        (3, ("x",), "model input 'x'"),
        (4, ("c1", "bn", "relu"), None),
        (5, ("c2",), "model output 'c2'"),
    ]
    assert groups[0].members == (M("c1/kernel", 2, "in"),)
    assert groups[1].members == (
        M("c1/kernel", 3, "out"),
        M("c1/bias", 0, "out"),
        M("bn/gamma", 0, "out"),
        M("bn/beta", 0, "out"),
        M("bn/moving_mean", 0, "out"),
        M("bn/moving_variance", 0, "out"),
        M("c2/kernel", 2, "in"),
    )
    assert groups[2].members == (M("c2/kernel", 3, "out"), M("c2/bias", 0, "out"))


def test_attention_heads_are_a_group():
    groups = channel_groups(attention())
    assert [(g.size, g.layers, g.pinned) for g in groups] == [
        (6, ("x",), "model input 'x'"),
        (4, ("embed", "mha", "add", "pool"), None),
        (3, ("mha",), None),
        (2, ("out",), "model output 'out'"),
    ]
    assert groups[1].members == (
        M("embed/kernel", 1, "out"),
        M("embed/bias", 0, "out"),
        M("mha/query/kernel", 0, "in"),
        M("mha/key/kernel", 0, "in"),
        M("mha/value/kernel", 0, "in"),
        # The addition joins the output projection's group to the stream.
        M("mha/attention_output/kernel", 2, "out"),
        M("mha/attention_output/bias", 0, "out"),
        M("out/kernel", 0, "in"),
    )
    # (4, heads, 2) kernels, (heads, 2) biases, a (heads, 2, 4) projection.
    assert groups[2].members == (
        M("mha/query/kernel", 1, "out"),
        M("mha/query/bias", 0, "out"),
        M("mha/key/kernel", 1, "out"),
        M("mha/key/bias", 0, "out"),
        M("mha/value/kernel", 1, "out"),
        M("mha/value/bias", 0, "out"),
        M("mha/attention_output/kernel", 0, "in"),
    )


def test_cross_attention_reads_query_key_and_value_from_their_tensors():
    x, c = keras.Input((5, 3), name="x"), keras.Input((7, 2), name="c")
    q = L.Dense(4, name="q_in")(x)
    k = L.Dense(5, name="k_in")(c)
    v = L.Dense(6, name="v_in")(c)
    mha = L.MultiHeadAttention(2, 3, use_bias=False, output_shape=8, name="mha")
    h = L.Dense(3, name="after")(mha(query=q, value=v, key=k))
    groups = channel_groups(keras.Model([x, c], L.Dense(2, name="out")(h)))
    assert by_layer(groups, "q_in").members[-1] == M("mha/query/kernel", 0, "in")
    assert by_layer(groups, "k_in").members[-1] == M("mha/key/kernel", 0, "in")
    assert by_layer(groups, "v_in").members[-1] == M("mha/value/kernel", 0, "in")
    heads, output = [g for g in groups if g.layers[0] == "mha"]
    assert (heads.size, output.size) == (2, 8)
    assert heads.members == (
        M("mha/query/kernel", 1, "out"),
        M("mha/key/kernel", 1, "out"),
        M("mha/value/kernel", 1, "out"),
        M("mha/attention_output/kernel", 0, "in"),
    )
    assert output.pinned is None
    assert output.members == (
        M("mha/attention_output/kernel", 2, "out"),
        M("after/kernel", 0, "in"),
    )


def attention_with(use_gate=False, **call_options):
    """Dense 4 ("before") -> attention (2 heads of 2, called with
    `call_options` and, where `attention_mask=True`, a mask input) -> Dense 3
    -> Dense 2."""
    inputs = [keras.Input((5, 3), name="x")]
    if call_options.get("attention_mask"):
        inputs.append(keras.Input((5, 5), name="mask", dtype="bool"))
        call_options["attention_mask"] = inputs[1]
    h = L.Dense(4, name="before")(inputs[0])
    h = L.MultiHeadAttention(2, 2, use_gate=use_gate, name="mha")(h, h, **call_options)
    if isinstance(h, tuple):  # (outputs, scores)
        h = h[0]
    h = L.Dense(3, name="after")(h)
    return keras.Model(inputs, L.Dense(2, name="out")(h))


def test_attention_mask_keeps_its_width_and_heads_stay_free():
    groups = channel_groups(attention_with(attention_mask=True))
    assert by_layer(groups, "mask").pinned == (
        "model input 'mask'; layer 'mha' (MultiHeadAttention) takes it as an "
        "attention mask"
    )
    heads = next(g for g in groups if g.layers[0] == "mha")
    assert heads.size == 2 and heads.pinned is None


def test_attention_returning_its_scores_keeps_its_heads():
    groups = channel_groups(attention_with(return_attention_scores=True))
    heads = next(g for g in groups if g.layers[0] == "mha")
    assert heads.size == 2 and heads.pinned == (
        "layer 'mha' (MultiHeadAttention) returns its attention scores, which "
        "have a heads axis"
    )
    assert by_layer(groups, "before").pinned is None


def test_key_given_by_position():
    x, c = keras.Input((5, 3), name="x"), keras.Input((7, 2), name="c")
    v = L.Dense(6, name="v_in")(c)
    k = L.Dense(5, name="k_in")(c)
    h = L.MultiHeadAttention(2, 3, name="mha")(L.Dense(4, name="q_in")(x), v, k)
    groups = channel_groups(keras.Model([x, c], L.Dense(2, name="out")(h)))
    assert by_layer(groups, "k_in").members[-1] == M("mha/key/kernel", 0, "in")
    assert by_layer(groups, "v_in").members[-1] == M("mha/value/kernel", 0, "in")


def test_shared_attention_keeps_one_head_group():
    """One attention layer called twice: its second call reads the first's
    output, so the stream and the output projection are one group, and the
    scores returned by the first call pin the heads of both."""
    inputs = keras.Input((5, 3), name="x")
    h = L.Dense(4, name="before")(inputs)
    mha = L.MultiHeadAttention(2, 2, name="mha")
    h, scores = mha(h, h, return_attention_scores=True)
    h = L.GlobalAveragePooling1D(name="pool")(mha(h, h))
    model = keras.Model(inputs, [L.Dense(2, name="out")(h), scores])
    groups = channel_groups(model)
    (heads,) = [g for g in groups if g.size == 2 and g.layers == ("mha",)]
    assert heads.pinned == (
        "layer 'mha' (MultiHeadAttention) returns its attention scores, which "
        "have a heads axis"
    )
    stream = by_layer(groups, "before")
    assert stream.layers == ("before", "mha", "pool") and stream.pinned is None
    assert M("mha/attention_output/kernel", 2, "out") in stream.members


def test_keep_whole_attention_keeps_its_heads():
    groups = channel_groups(attention_with(), keep_whole=["mha"])
    heads = next(g for g in groups if g.layers[0] == "mha")
    assert heads.pinned == "keep_whole layer 'mha'"
    assert heads.members[0] == M("mha/query/kernel", 1, "out")
    assert by_layer(groups, "before").pinned is None


def test_elementwise_operations_pass_channels_through():
    groups = channel_groups(operations())
    group = by_layer(groups, "c1")
    assert group.pinned is None
    assert group.members == (
        M("c1/kernel", 3, "out"),
        M("c1/bias", 0, "out"),
        M("c2/kernel", 2, "in"),
    )
    assert len(group.layers) == 5  # c1, add, relu6, multiply, true_divide


@pytest.mark.parametrize(
    "apply, reason",
    [
        (lambda h: h + np.arange(4.0), "applies a constant of more than one value"),
        (lambda h: 1.0 / h, "divides by a tensor"),
        (lambda h: h - keras.ops.mean(h, axis=-1, keepdims=True), "(Mean) is not"),
        (lambda h: keras.ops.log(h), "(Log) is not a layer"),
        (lambda h: keras.ops.sqrt(h), "(Sqrt) is not a layer"),
        (
            lambda h: keras.ops.clip(h, np.arange(4.0), 6.0),
            "(Clip) applies a constant of more than one value",
        ),
    ],
)
def test_operations_that_pin(apply, reason):
    inputs = keras.Input((3, 3, 3), name="x")
    h = L.Conv2D(4, 1, name="before")(inputs)
    h = L.Conv2D(4, 1, name="after")(apply(h))
    groups = channel_groups(keras.Model(inputs, L.Conv2D(2, 1, name="out")(h)))
    assert reason in by_layer(groups, "before").pinned
    assert by_layer(groups, "after").pinned is None


def test_operations_with_scalar_attributes_pass_channels_through():
    inputs = keras.Input((3, 3, 3), name="x")
    h = L.Conv2D(4, 1, name="before")(inputs)
    h = keras.ops.leaky_relu(keras.ops.clip(h, -1.0, 6.0), 0.2)
    groups = channel_groups(keras.Model(inputs, L.Conv2D(2, 1, name="out")(h)))
    assert by_layer(groups, "before").pinned is None


def test_an_operation_broadcasting_along_channels_pins_the_narrow_input():
    inputs = keras.Input((3, 3, 2), name="x")
    h = L.Conv2D(4, 1, name="wide")(inputs) * L.Conv2D(1, 1, name="gate")(inputs)
    groups = channel_groups(keras.Model(inputs, L.Conv2D(2, 1, name="out")(h)))
    assert "(Multiply) broadcasts" in by_layer(groups, "gate").pinned
    assert by_layer(groups, "wide").pinned is None


def test_gated_attention_is_pinned():
    groups = channel_groups(attention_with(use_gate=True))
    assert "'mha' (MultiHeadAttention) holds weights it does not declare" in (
        by_layer(groups, "before").pinned
    )


def test_depthwise_follows_its_input():
    group = by_layer(channel_groups(depthwise()), "expand")
    assert group.pinned is None
    assert group.layers == ("expand", "dw", "dw_bn")
    assert group.members[:3] == (
        M("expand/kernel", 3, "out"),
        M("dw/kernel", 2, "out"),  # (3, 3, C, 1): axis 2
        M("dw/bias", 0, "out"),
    )
    assert group.members[-1] == M("project/kernel", 2, "in")


def test_separable_conv_reads_with_its_depthwise_filters():
    inputs = keras.Input((6, 6, 3), name="x")
    h = L.Conv2D(4, 1, name="c")(inputs)
    h = L.SeparableConv2D(5, 3, name="sep")(h)
    groups = channel_groups(keras.Model(inputs, L.Conv2D(2, 1, name="out")(h)))
    assert by_layer(groups, "c").members == (
        M("c/kernel", 3, "out"),
        M("c/bias", 0, "out"),
        M("sep/depthwise_kernel", 2, "out"),  # (3, 3, 4, 1)
        M("sep/pointwise_kernel", 2, "in"),  # (1, 1, 4, 5)
    )
    assert by_layer(groups, "sep").members == (
        M("sep/pointwise_kernel", 3, "out"),
        M("sep/bias", 0, "out"),
        M("out/kernel", 2, "in"),
    )


def test_depthwise_on_the_input_is_pinned_with_it():
    inputs = keras.Input((4, 4, 3), name="x")
    h = L.DepthwiseConv2D(3, name="dw")(inputs)
    h = L.Conv2D(2, 1, name="c")(h)
    model = keras.Model(inputs, L.Conv2D(2, 1, name="out")(h))
    group = by_layer(channel_groups(model), "x")
    assert group.pinned == "model input 'x'"
    assert M("dw/kernel", 2, "out") in group.members


def test_residual_add_merges_partners():
    groups = channel_groups(residual())
    (merged,) = [g for g in groups if "add" in g.layers]
    assert merged.pinned is None
    assert merged.layers == ("a", "b", "add", "relu")
    assert merged.members == (
        M("a/kernel", 3, "out"),
        M("a/bias", 0, "out"),
        M("b/kernel", 3, "out"),
        M("b/bias", 0, "out"),
        M("out/kernel", 2, "in"),
    )
    assert len(groups) == 3  # input, the merged pair, output


def test_concatenate_offsets():
    groups = channel_groups(concatenate())
    a, b = by_layer(groups, "a"), by_layer(groups, "b")
    assert (a.size, b.size) == (2, 3)
    assert a.members == (
        M("a/kernel", 3, "out"),
        M("a/bias", 0, "out"),
        *(M(f"bn/{n}", 0, "out") for n in channels_bn_names()),
        M("out/kernel", 2, "in"),
    )
    assert b.members == (
        M("b/kernel", 3, "out"),
        M("b/bias", 0, "out"),
        *(M(f"bn/{n}", 0, "out", offset=2) for n in channels_bn_names()),
        M("out/kernel", 2, "in", offset=2),
    )
    # Channels 0 and 2 of b sit at rows 2 and 4 of out's input axis.
    assert member_indices(b.members[-1], [0, 2]).tolist() == [2, 4]


def channels_bn_names():
    return ("gamma", "beta", "moving_mean", "moving_variance")


def test_flatten_into_dense_strides_by_channels():
    group = by_layer(channel_groups(flatten_dense()), "conv")
    assert group.layers == ("conv", "pool", "flatten")
    consumer = group.members[-1]
    # (2, 2, 3) flattened row-major: channel c of position j is row c + 3*j.
    assert consumer == M("fc/kernel", 0, "in", stride=3, repeat=4)
    assert member_indices(consumer, [1]).tolist() == [1, 4, 7, 10]
    assert member_indices(consumer, [0, 2]).tolist() == [0, 2, 3, 5, 6, 8, 9, 11]


def test_flatten_rows_are_where_the_channel_lands():
    """The Dense rows of channel 1 are exactly where the flattened vector
    changes when only conv channel 1 changes."""
    model = flatten_dense()
    flat = keras.Model(model.input, model.get_layer("flatten").output)
    kernel = model.get_layer("conv").kernel
    x = np.random.default_rng(0).normal(size=(1, 4, 4, 1)).astype("float32")
    before = flat(x).numpy()
    value = kernel.numpy()
    value[..., 1] += 1.0
    kernel.assign(value)
    changed = np.flatnonzero(np.abs(flat(x).numpy() - before)[0] > 0)
    consumer = by_layer(channel_groups(model), "conv").members[-1]
    assert changed.tolist() == member_indices(consumer, [1]).tolist()


def test_reshape_to_a_multiple_of_the_channels():
    groups = channel_groups(reshape())
    conv, fc = by_layer(groups, "conv"), by_layer(groups, "fc")
    assert conv.members[-1] == M("fc/kernel", 0, "in", stride=3, repeat=2)
    assert fc.layers == ("fc", "same", "flatten")
    assert fc.members[-1] == M("logits/kernel", 0, "in", stride=4, repeat=2)


def test_shared_layer_merges_its_inputs():
    groups = channel_groups(shared())
    (inputs,) = [g for g in groups if "a" in g.layers]
    assert "b" in inputs.layers
    assert M("tied/kernel", 2, "in") in inputs.members
    tied = by_layer(groups, "tied")
    # Concatenating the shared layer's two calls: one group at offsets 0 and 3.
    assert M("out/kernel", 2, "in", offset=0) in tied.members
    assert M("out/kernel", 2, "in", offset=3) in tied.members


# -- pinning ----------------------------------------------------------------------


def test_model_output_is_pinned():
    groups = channel_groups(flatten_dense())
    assert by_layer(groups, "logits").pinned == "model output 'logits'"
    assert by_layer(groups, "fc").pinned is None


def test_keep_whole():
    groups = channel_groups(flatten_dense(), keep_whole=["pool"])
    assert by_layer(groups, "conv").pinned == "keep_whole layer 'pool'"
    assert by_layer(groups, "fc").pinned is None


def test_keep_whole_unknown_name():
    with pytest.raises(ValueError, match=r"does not have.*unknown=\['nope'\]"):
        channel_groups(conv_bn_conv(), keep_whole=["nope"])
    with pytest.raises(ValueError, match="keep_whole='bn'"):
        channel_groups(conv_bn_conv(), keep_whole="bn")


@pytest.mark.parametrize(
    "layer, reason",
    [
        (L.LayerNormalization(name="odd"), "'odd' (LayerNormalization) is not a layer"),
        (L.Lambda(lambda t: t * 2, name="odd"), "'odd' (Lambda) is not a layer"),
        (L.Activation("softmax", name="odd"), "'odd' (Activation) applies softmax"),
        (L.DepthwiseConv2D(1, depth_multiplier=2, name="odd"), "depth_multiplier=2"),
        (L.SeparableConv2D(4, 1, depth_multiplier=2, name="odd"), "multiplier=2"),
        (
            L.Reshape((9, 2, 2), name="odd"),
            "'odd' (Reshape) reshapes a last axis of 4 into 2",
        ),
        (L.Softmax(name="odd"), "'odd' (Softmax) is not a layer"),
    ],
)
def test_unknown_layer_pins_its_groups(layer, reason):
    inputs = keras.Input((3, 3, 3), name="x")
    h = L.Conv2D(4, 1, name="before")(inputs)
    h = layer(h)
    h = L.Conv2D(4, 1, name="after")(h)
    model = keras.Model(inputs, L.Conv2D(2, 1, name="out")(h))
    groups = channel_groups(model)
    assert reason in by_layer(groups, "before").pinned
    assert by_layer(groups, "after").pinned is None


def test_broadcasting_merge_pins_the_broadcast_input():
    inputs = keras.Input((3, 3, 2), name="x")
    h = L.Conv2D(4, 1, name="wide")(inputs)
    gate = L.Conv2D(1, 1, name="gate")(inputs)
    h = L.Multiply(name="mul")([h, gate])
    model = keras.Model(inputs, L.Conv2D(2, 1, name="out")(h))
    groups = channel_groups(model)
    assert "'mul' (Multiply) broadcasts" in by_layer(groups, "gate").pinned
    assert by_layer(groups, "wide").pinned is None


def test_subclassed_model_is_refused():
    class Tiny(keras.Model):
        def __init__(self):
            super().__init__(name="tiny")
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Tiny()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match=r"model 'tiny' \(Tiny\) is subclassed"):
        channel_groups(model)
    lazy = keras.Sequential([L.Dense(2)], name="lazy")
    with pytest.raises(
        ValueError, match=r"model 'lazy' \(Sequential\) is subclassed or"
    ):
        channel_groups(lazy)


def test_nothing_to_narrow():
    inputs = keras.Input((3,), name="x")
    model = keras.Model(inputs, L.Dense(2, name="only")(inputs), name="linear")
    with pytest.raises(ValueError, match="No layer of model 'linear' can be narrowed"):
        channel_groups(model)


def test_member_rejects_bad_values():
    with pytest.raises(ValueError, match="role='both'"):
        Member("k", 0, "both")
    with pytest.raises(ValueError, match="stride=0, repeat=3"):
        Member("k", 0, "in", repeat=3)
    with pytest.raises(ValueError, match=r"channels=\[-1\]"):
        member_indices(Member("k", 0, "in"), [-1])


def is_heads(group):
    """Whether `group` is an attention layer's heads (carried by no tensor)."""
    return any(m.path.endswith("query/kernel") and m.axis == 1 for m in group.members)


def test_every_tensor_position_has_one_group():
    """Each layer's output width is the sum of its groups' sizes times the
    positions they recur at: the groups cover every channel exactly once.
    (Not `shared`, whose concatenation holds one group twice.)"""
    for name, build in HAND_MODELS.items():
        if name == "shared":
            continue
        model = build()
        groups = channel_groups(model)
        for layer in model.layers:
            width = layer.output.shape[-1]
            carried = sum(
                g.size for g in groups if layer.name in g.layers and not is_heads(g)
            )
            if isinstance(layer, (L.Flatten, L.Reshape)):
                assert width % carried == 0, (model.name, layer.name)
            else:
                assert carried == width, (model.name, layer.name)


# -- real models --------------------------------------------------------------------


def test_resnet20_groups():
    """1 input + 3 residual streams (a stage's convs joined by its additions) +
    9 first convs of the blocks + logits = 14; input and logits pinned."""
    groups = channel_groups(zoo.build("resnet20", (32, 32, 3), 10))
    assert len(groups) == 14
    assert [g.pinned for g in groups if g.pinned] == [
        "model input 'input'",
        "model output 'logits'",
    ]
    stream = by_layer(groups, "stem_conv")
    assert {"stage1_block1_add", "stage1_block3_add"} <= set(stream.layers)
    assert stream.size == 16


def test_mobilenetv2_groups():
    """1 input + the stem + 16 expansions + 7 stage streams (projections joined
    by residual additions) + the 1280-wide head + predictions = 27."""
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None
    )
    groups = channel_groups(model)
    assert len(groups) == 27
    pinned = [g for g in groups if g.pinned]
    assert [g.layers[0] for g in pinned] == [model.layers[0].name, "predictions"]
    assert "applies softmax" in pinned[1].pinned
    head = by_layer(groups, "Conv_1")
    assert head.size == 1280 and head.pinned is None


@pytest.mark.parametrize("module", [channels, channel_members])
def test_docstring_examples(module):
    failures, tried = doctest.testmod(module)
    assert tried and not failures


def test_to_dict():
    group = ChannelGroup(2, (M("k", 1, "out"),), ("conv",), None)
    assert group.to_dict()["members"][0]["path"] == "k"
