"""Channel-granularity levels: whole channels, nested, frozen, physically removable."""

import doctest

import keras
import numpy as np
import pytest

import elsa_tf
from elsa_tf import channel_levels, levels, model_ops, sparsifiers
from elsa_tf.channel_levels import GroupLayout, Slice

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# -- fixtures: tiny models on 8x8x1 inputs -----------------------------------------


def conv_bn_gap():
    """Conv 6 -> BN -> ReLU -> Conv 5 -> GAP -> Dense 3."""
    inputs = keras.Input((8, 8, 1), name="x")
    h = L.Conv2D(6, 3, padding="same", name="c1")(inputs)
    h = L.BatchNormalization(name="bn")(h)
    h = L.ReLU(name="relu")(h)
    h = L.Conv2D(5, 3, name="c2", activation="relu")(h)
    h = L.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(inputs, L.Dense(3, name="fc")(h), name="conv_bn_gap")


def residual_add():
    """Stem conv 4 -> [conv 4 (BN), identity] added -> depthwise -> GAP -> Dense 3."""
    inputs = keras.Input((8, 8, 1), name="x")
    stem = L.Conv2D(4, 3, padding="same", activation="relu", name="stem")(inputs)
    h = L.Conv2D(4, 3, padding="same", name="branch")(stem)
    h = L.BatchNormalization(name="branch_bn")(h)
    h = L.Add(name="add")([stem, h])
    h = L.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = L.ReLU(name="relu")(h)
    h = L.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(inputs, L.Dense(3, name="fc")(h), name="residual_add")


def flatten_dense():
    """Conv 4 -> pool to 4x4 -> Flatten (64) -> Dense 6 -> Dense 3, Sequential."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(4, 3, padding="same", activation="relu", name="conv"),
            L.MaxPooling2D(name="pool"),
            L.Flatten(name="flatten"),
            L.Dense(6, activation="relu", name="hidden"),
            L.Dense(3, name="fc"),
        ],
        name="flatten_dense",
    )


MODELS = {f.__name__: f for f in (conv_bn_gap, residual_add, flatten_dense)}
SPARSITIES = [0.7, 0.4, 0.0]


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    return x, (x[:, :4, :4, 0].sum(axis=(1, 2)) > 0).astype("int32") + (
        x[:, 4:, 4:, 0].sum(axis=(1, 2)) > 0
    ).astype("int32")


def embed(name, selection="per_layer", **kwargs):
    return elsa_tf.embed(
        MODELS[name](),
        SPARSITIES,
        granularity="channel",
        selection=selection,
        **kwargs,
    )


def channel_codes(model):
    return channel_levels.channel_codes(
        [m.numpy() for m in model.level_maps], model.channel_layout
    )


def randomize_level(model):
    """Gives the current level's free weights random values, as training would."""
    rng = np.random.default_rng(model.current_level)
    for w, m in zip(model.prunable_weights, model.level_maps):
        free = m.numpy() >= model.current_level
        value = w.numpy()
        value[free] = rng.normal(size=int(free.sum())) * 0.3
        w.assign(value)


def finish_all(model):
    """Every level pruned and finished without training (random free weights)."""
    for _ in range(model.num_levels):
        randomize_level(model)
        elsa_tf.finish_level(model)
    return model


# -- the pure math -----------------------------------------------------------------


def test_docstring_examples():
    assert doctest.testmod(channel_levels).failed == 0


def hand_layout():
    """Two groups on a Dense kernel (4 x 3): group 0 indexes its input rows
    twice (a flatten of 2 positions x 2 channels), group 1 its columns, and a
    bias of 3 (its "out" members)."""
    rows = Slice(0, 0, np.array([0, 1, 2, 3]), "in")
    return [
        GroupLayout(0, 2, (Slice(1, 0, np.arange(2), "out"), rows), "a"),
        GroupLayout(
            1,
            3,
            (Slice(0, 1, np.arange(3), "out"), Slice(2, 0, np.arange(3), "out")),
            "b",
        ),
    ]


def test_element_codes_take_the_later_channel():
    codes = [np.array([0, 2], np.uint8), np.array([1, 0, 255], np.uint8)]
    maps = channel_levels.element_codes(codes, hand_layout(), [(4, 3), (2,), (3,)])
    np.testing.assert_array_equal(
        maps[0],
        [[1, 0, 255], [2, 2, 255], [1, 0, 255], [2, 2, 255]],
    )
    np.testing.assert_array_equal(maps[1], [0, 2])
    np.testing.assert_array_equal(maps[2], [1, 0, 255])
    back = channel_levels.channel_codes(maps, hand_layout())
    for got, want in zip(back, codes):
        np.testing.assert_array_equal(got, want)


def test_channel_scores_use_out_slices_per_element():
    kernel = np.array([[3.0, 0.0, 1.0]] * 4)
    layout = hand_layout()
    scores = [kernel, np.array([5.0, 7.0]), np.array([4.0, 0.0, 1.0])]
    l2 = channel_levels.channel_scores(scores, layout, "l2")
    # Column 0: four 3s and the bias 4, root mean square.
    np.testing.assert_allclose(l2[1], [np.sqrt((4 * 9 + 16) / 5), 0.0, 1.0])
    # Group 0's only "out" slice is the bias; the kernel rows are "in".
    np.testing.assert_allclose(l2[0], [5.0, 7.0])
    l1 = channel_levels.channel_scores(scores, layout, "l1")
    np.testing.assert_allclose(l1[1], [16 / 5, 0.0, 1.0])


def test_out_slices_mark_the_new_channels_own_weights():
    masks = channel_levels.out_slices(
        [np.array([False, True]), np.array([True, False, False])],
        hand_layout(),
        [(4, 3), (2,), (3,)],
    )
    np.testing.assert_array_equal(masks[0][:, 0], True)
    assert masks[0].sum() == 4  # rows read from group 0 are not its own
    np.testing.assert_array_equal(masks[1], [False, True])
    np.testing.assert_array_equal(masks[2], [True, False, False])


def test_global_selection_keeps_a_channel_in_every_group():
    scores = [np.array([9.0, 8.0, 7.0, 6.0]), np.array([0.1, 0.2])]
    candidates = [np.ones(4, bool), np.ones(2, bool)]
    frozen = [np.zeros(4, bool), np.zeros(2, bool)]
    kept = channel_levels.keep_channels(
        scores, candidates, frozen, 0.5, selection="global"
    )
    assert [k.tolist() for k in kept] == [
        [True, True, False, False],
        [False, True],
    ]


# -- the embedded model ------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_prunable_weights_are_the_unpinned_groups_members(name):
    model = embed(name)
    members = {
        m.path for g in model.channel_groups if g.pinned is None for m in g.members
    }
    paths = [w.path for w in model.prunable_weights]
    assert set(paths) == {
        v.path for v in model.inner_model.trainable_weights if v.path in members
    }
    # Moving statistics stay shared weights (banked per level by default).
    assert not any("moving" in p for p in paths)
    assert all(w.trainable for w in model.prunable_weights)


@pytest.mark.parametrize("selection", ["per_layer", "global"])
@pytest.mark.parametrize("name", MODELS)
def test_codes_are_channel_codes_nested_and_on_target(name, selection):
    model = finish_all(embed(name, selection))
    maps = [m.numpy() for m in model.level_maps]
    codes = channel_codes(model)
    # Every element carries the code of its channels (the later of two).
    shapes = [m.shape for m in maps]
    for got, want in zip(
        channel_levels.element_codes(codes, model.channel_layout, shapes), maps
    ):
        np.testing.assert_array_equal(got, want)
    # One-axis members (biases, BN parameters) carry the channel's code exactly.
    for group, group_codes in zip(model.channel_layout, codes):
        for piece in group.slices:
            if maps[piece.weight].ndim == 1:
                np.testing.assert_array_equal(
                    maps[piece.weight][piece.indices],
                    np.tile(group_codes, len(piece.indices) // group.size),
                )
    sizes = [g.size for g in model.channel_layout]
    for k, sparsity in enumerate(SPARSITIES):
        kept = [c <= k for c in codes]
        if k:
            previous = [c <= k - 1 for c in codes]
            assert all((p <= q).all() for p, q in zip(previous, kept))  # nested
        assert all(k_.any() for k_ in kept)
        counts = [int(k_.sum()) for k_ in kept]
        if selection == "per_layer":
            assert counts == [levels.keep_count(n, sparsity) for n in sizes]
        else:
            assert sum(counts) == levels.keep_count(sum(sizes), sparsity)


@pytest.mark.parametrize("name", MODELS)
def test_physical_extract_equals_masked_extract(name):
    model = finish_all(embed(name))
    x, _ = data(8)
    dense_params = model.inner_model.count_params()
    for k, sparsity in enumerate(SPARSITIES):
        masked = elsa_tf.extract(model, k)
        small = elsa_tf.extract(model, k, physical=True)
        assert type(small) is type(model.inner_model)
        np.testing.assert_allclose(
            small.predict(x, verbose=0), masked.predict(x, verbose=0), atol=1e-5
        )
        np.testing.assert_allclose(
            masked.predict(x, verbose=0),
            (elsa_tf.set_level(model, k), model.predict(x, verbose=0))[1],
            atol=1e-6,
        )
        if sparsity > 0:
            assert small.count_params() < dense_params
        else:
            assert small.count_params() == dense_params


@pytest.mark.parametrize("sparsifier", sparsifiers.NAMES)
@pytest.mark.parametrize("name", MODELS)
def test_fit_freezes_finished_levels_exactly(name, sparsifier):
    model = embed(name, sparsifier=sparsifier)
    x, y = data()
    predictions, weights = {}, {}
    for k in range(model.num_levels):
        elsa_tf.fit(
            model,
            x,
            y,
            epochs_per_level=1,
            levels=[k],
            batch_size=16,
            optimizer=keras.optimizers.Adam(1e-2),
            loss=LOSS,
            verbose=0,
        )
        predictions[k] = elsa_tf.extract(model, k).predict(x, verbose=0)
        weights[k] = [v.copy() for v in model.effective_weights(k).values()]
        # Channels opened by later levels start with live weights.
        if k + 1 < model.num_levels:
            fresh = channel_levels.out_slices(
                [c == k + 1 for c in channel_codes(model)],
                model.channel_layout,
                [m.shape for m in model.level_maps],
            )
            assert any(
                (w.numpy()[f] != 0).any() for w, f in zip(model.prunable_weights, fresh)
            )
    for k in range(model.num_levels):
        np.testing.assert_array_equal(
            elsa_tf.extract(model, k).predict(x, verbose=0), predictions[k]
        )
        for before, after in zip(weights[k], model.effective_weights(k).values()):
            np.testing.assert_array_equal(before, after)


def test_save_load_keeps_granularity_and_predictions(tmp_path):
    model = finish_all(embed("conv_bn_gap", "global"))
    x, _ = data(8)
    path = tmp_path / "channels.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.granularity == "channel"
    assert loaded.sparsifier == model.sparsifier
    for k in range(model.num_levels):
        for a, b in [
            (elsa_tf.extract(model, k), elsa_tf.extract(loaded, k)),
            (
                elsa_tf.extract(model, k, physical=True),
                elsa_tf.extract(loaded, k, physical=True),
            ),
        ]:
            np.testing.assert_array_equal(
                a.predict(x, verbose=0), b.predict(x, verbose=0)
            )


@pytest.mark.parametrize(
    "cls", [sparsifiers.GradualMagnitude, sparsifiers.DynamicPruningWithFeedback]
)
def test_sparsifier_config_round_trips_granularity(cls):
    sparsifier = cls(granularity="channel", channel_norm="l1", selection="per_layer")
    config = keras.saving.serialize_keras_object(sparsifier)
    again = keras.saving.deserialize_keras_object(config)
    assert (again.granularity, again.channel_norm) == ("channel", "l1")
    # Files written before granularity existed load as weight granularity.
    old = dict(sparsifier.get_config())
    del old["granularity"], old["channel_norm"]
    assert cls.from_config(old).granularity == "weight"


def test_embed_passes_granularity_to_a_named_sparsifier_only():
    model = embed("conv_bn_gap", sparsifier="dpf")
    assert model.sparsifier.granularity == "channel"
    with pytest.raises(ValueError, match="set on a sparsifier object itself"):
        elsa_tf.embed(
            conv_bn_gap(),
            SPARSITIES,
            sparsifier=sparsifiers.GradualMagnitude(),
            granularity="channel",
        )
    model = elsa_tf.embed(
        conv_bn_gap(),
        SPARSITIES,
        sparsifier=sparsifiers.GradualMagnitude(granularity="channel"),
    )
    assert model.granularity == "channel"


# -- bad input ---------------------------------------------------------------------


def test_unknown_granularity():
    with pytest.raises(ValueError, match=r"granularity must be one of .*'block'"):
        elsa_tf.embed(conv_bn_gap(), SPARSITIES, granularity="block")
    with pytest.raises(ValueError, match=r"granularity must be one of .*'filter'"):
        sparsifiers.GradualMagnitude(granularity="filter")
    with pytest.raises(ValueError, match=r"channel_norm must be one of .*'l3'"):
        sparsifiers.GradualMagnitude(granularity="channel", channel_norm="l3")


def test_block_shape_with_channels():
    with pytest.raises(
        ValueError, match=r"block_shape=\(4, 1\), granularity='channel'"
    ):
        elsa_tf.embed(
            conv_bn_gap(), SPARSITIES, granularity="channel", block_shape=(4, 1)
        )


def test_prune_with_channels():
    with pytest.raises(ValueError, match=r"prune does not apply.*Received: prune="):
        elsa_tf.embed(conv_bn_gap(), SPARSITIES, granularity="channel", prune=["c1"])


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = L.Dense(4)
        self.out = L.Dense(2)

    def call(self, x):
        return self.out(self.hidden(x))


def test_subclassed_model():
    model = Subclassed(name="sub")
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match=r"granularity='channel'.*'sub'.*subclassed"):
        elsa_tf.embed(model, SPARSITIES, granularity="channel")


def test_nothing_to_narrow():
    base = keras.Sequential([keras.Input((4,)), L.Dense(2, name="only")], name="one")
    with pytest.raises(ValueError, match=r"No layer of model 'one' can be narrowed"):
        elsa_tf.embed(base, SPARSITIES, granularity="channel")


def test_level_that_empties_a_group():
    # Group of 'c2' has 5 channels: 90% per layer keeps round(0.5) = 0.
    with pytest.raises(
        ValueError, match=r"sparsity 0.9 removes every channel of layer 'c2'"
    ):
        elsa_tf.embed(
            conv_bn_gap(), [0.9, 0.0], granularity="channel", selection="per_layer"
        )
    # Globally, 11 channels at 95% keep 1, fewer than the 2 groups.
    with pytest.raises(ValueError, match=r"keeps 1 of 11 channels, fewer than the 2"):
        elsa_tf.embed(conv_bn_gap(), [0.95, 0.0], granularity="channel")


def test_physical_extract_at_weight_granularity():
    model = elsa_tf.embed(conv_bn_gap(), SPARSITIES)
    with pytest.raises(
        ValueError, match=r"granularity='channel'.*granularity='weight'"
    ):
        elsa_tf.extract(model, 0, physical=True)


@pytest.mark.slow
def test_mobilenet_v2_smoke():
    base = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=4
    )
    model = elsa_tf.embed(base, [0.5, 0.0], granularity="channel")
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    randomize_level(model)
    elsa_tf.finish_level(model)
    masked = elsa_tf.extract(model, 0)
    small = elsa_tf.extract(model, 0, physical=True)
    assert small.count_params() < masked.count_params()
    np.testing.assert_allclose(
        small.predict(x, verbose=0), masked.predict(x, verbose=0), atol=1e-5
    )
    kept = model_ops.channel_keep(model, 0)
    total = sum(g.size for g in model.channel_layout)
    assert sum(int(k.sum()) for k in kept.values()) == levels.keep_count(total, 0.5)


def test_channel_levels_keep_normalization_statistics_per_level_by_default():
    # A channel dropped at level 0 outputs a constant: frozen statistics would
    # keep its variance near zero for the levels that give it weights.
    assert embed("conv_bn_gap").shared == "per_level_statistics"
    assert embed("conv_bn_gap", shared="freeze").shared == "freeze"
    weights = elsa_tf.embed(MODELS["conv_bn_gap"](), SPARSITIES)
    assert weights.shared == "freeze"


def residual_block():
    """Stem conv 4 -> [conv 6 -> BN -> ReLU -> conv 4] added -> depthwise ->
    GAP -> Dense 6 -> Dense 3: a residual stream and two inner groups."""
    inputs = keras.Input((8, 8, 1), name="x")
    stem = L.Conv2D(4, 3, padding="same", activation="relu", name="stem")(inputs)
    h = L.Conv2D(6, 3, padding="same", name="inner")(stem)
    h = L.BatchNormalization(name="inner_bn")(h)
    h = L.ReLU(name="inner_relu")(h)
    h = L.Conv2D(4, 3, padding="same", name="branch")(h)
    h = L.Add(name="add")([stem, h])
    h = L.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = L.GlobalAveragePooling2D(name="gap")(h)
    h = L.Dense(6, activation="relu", name="hidden")(h)
    return keras.Model(inputs, L.Dense(3, name="fc")(h), name="residual_block")


def test_keep_whole_pins_the_named_layers_channels(tmp_path):
    # The residual stream (stem, branch, add, dw) kept whole: the inner conv
    # and the hidden Dense layer still narrow; the stream keeps its width.
    model = elsa_tf.embed(
        residual_block(),
        SPARSITIES,
        granularity="channel",
        selection="per_layer",
        keep_whole=["add"],
    )
    plain = elsa_tf.embed(
        residual_block(), SPARSITIES, granularity="channel", selection="per_layer"
    )
    assert len(model.channel_layout) == len(plain.channel_layout) - 1
    finish_all(model)
    x, _ = data(8)
    for k in range(model.num_levels):
        small = elsa_tf.extract(model, k, physical=True)
        assert small.get_layer("stem").filters == 4
        assert small.get_layer("branch").filters == 4
        if SPARSITIES[k] > 0:
            assert small.get_layer("inner").filters < 6
            assert small.get_layer("hidden").units < 6
        np.testing.assert_allclose(
            small.predict(x, verbose=0),
            elsa_tf.extract(model, k).predict(x, verbose=0),
            atol=1e-5,
        )
    path = tmp_path / "keep_whole.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.keep_whole == ["add"]
    assert len(loaded.channel_layout) == len(model.channel_layout)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(keep_whole=["nope"]), ValueError, r"unknown=\['nope'\]"),
        (dict(keep_whole="add"), ValueError, "keep_whole='add'"),
        (dict(granularity="weight", keep_whole=["add"]), ValueError, "weight"),
        (
            dict(keep_whole=["add", "inner", "hidden"]),
            ValueError,
            "No layer of model 'residual_block' can be narrowed",
        ),
    ],
)
def test_keep_whole_bad_input(kwargs, error, match):
    options = {"granularity": "channel", **kwargs}
    with pytest.raises(error, match=match):
        elsa_tf.embed(residual_block(), SPARSITIES, selection="per_layer", **options)


def test_attention_layers_own_their_weights_by_path():
    """Two attention layers each hold a "query" sublayer: their weights are
    owned by "mha1/query" and "mha2/query", and each layer's heads are a group."""
    inputs = keras.Input((5, 3))
    h = L.Dense(8, name="embed")(inputs)
    h = L.Add()([h, L.MultiHeadAttention(4, 2, name="mha1")(h, h)])
    h = L.Add()([h, L.MultiHeadAttention(3, 2, name="mha2")(h, h)])
    h = L.GlobalAveragePooling1D()(h)
    model = elsa_tf.embed(
        keras.Model(inputs, L.Dense(3, name="fc")(h)), [0.5, 0.0], granularity="channel"
    )
    owners = dict(zip((w.path for w in model.prunable_weights), model.weight_owners))
    assert owners["mha1/query/kernel"] == "mha1/query"
    assert owners["mha2/query/kernel"] == "mha2/query"
    assert owners["mha2/attention_output/bias"] == "mha2/attention_output"
    assert [(g.layer, g.size) for g in model.channel_layout] == [
        ("embed", 8),
        ("mha1", 4),
        ("mha2", 3),
    ]


def test_a_separable_convolution_opens_channels_from_its_own_initializers():
    from elsa_tf.elsa_model import _initializer

    layer = L.SeparableConv2D(
        3, 3, depthwise_initializer="zeros", pointwise_initializer="ones"
    )
    layer.build((None, 5, 5, 2))
    assert isinstance(
        _initializer(layer, layer.pointwise_kernel), keras.initializers.Ones
    )
    assert isinstance(
        _initializer(layer, layer.depthwise_kernel), keras.initializers.Zeros
    )
    dense = L.Dense(2, kernel_initializer="ones")
    dense.build((None, 3))
    assert isinstance(_initializer(dense, dense.kernel), keras.initializers.Ones)
