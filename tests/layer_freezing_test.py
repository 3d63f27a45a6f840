"""SpFDE's progressive layer freezing inside ELSA levels (`layer_freezing`)."""

import doctest
import warnings

import keras
import numpy as np
import pytest
from conftest import LOSS, cnn_with_bn, image_data

import elsa_tf
from elsa_tf import layer_freezing as lf
from elsa_tf import model_ops
from elsa_tf import optimizer as optimizer_lib

# -- planning, by hand ------------------------------------------------------------


def test_flops_model_by_hand():
    # 3 * (1 + 2 + 3 + 4) - 1: no input gradient for the first block.
    assert lf.training_cost([1, 2, 3, 4]) == 29.0
    # Freezing block 0 saves its weight gradient (1) and block 1's input
    # gradient (2); freezing blocks 0 and 1 also saves block 1's weight
    # gradient (2) and block 2's input gradient (3).
    assert lf.saving([1, 2, 3, 4], 0) == 0.0
    assert lf.saving([1, 2, 3, 4], 1) == 3.0
    assert lf.saving([1, 2, 3, 4], 2) == 8.0
    # All but the last: what is left is every forward (10) and the last
    # block's weight gradient (4).
    assert lf.training_cost([1, 2, 3, 4]) - lf.saving([1, 2, 3, 4], 3) == 14.0
    assert lf.planned_share([1, 1, 1, 1], [0, 1, 2, 2]) == pytest.approx(10 / 44)


def test_plan_by_hand():
    forward = [1.0, 1.0, 1.0, 1.0]  # a step costs 11; savings 2, 4, 6
    # One block: (2 + 2 + 2) / 44 = 0.136 < 0.2; two: 10 / 44 = 0.227.
    assert lf.plan(forward, epochs=4, start=1, interval=1, share=0.2) == [0, 1, 2, 2]
    assert lf.plan(forward, epochs=4, start=1, interval=1, share=0.1) == [0, 1, 1, 1]
    assert lf.plan(forward, epochs=4, start=1, interval=1, share=0.0) == [0, 0, 0, 0]
    # Every 2 epochs from epoch 0.
    assert lf.plan(forward, epochs=6, start=0, interval=2, share=0.5) == [
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    # Out of reach: as many as the level allows, never the last block.
    assert lf.plan(forward, epochs=3, start=0, interval=1, share=0.99) == [1, 2, 3]
    assert lf.plan(forward, epochs=8, start=6, interval=1, share=0.99) == [
        0,
        0,
        0,
        0,
        0,
        0,
        1,
        2,
    ]
    assert lf.plan(forward, epochs=4, start=4, interval=1, share=0.5) == [0] * 4


def test_docstring_examples():
    failures, tried = doctest.testmod(lf)
    assert tried >= 6 and not failures


def test_start_epoch_waits_for_the_last_mask_update():
    # 8 epochs of 10 steps: half the level is epoch 4; the last update, at
    # step 44, is in epoch 4, so the first epoch with fixed masks is 5.
    assert lf.start_epoch(8, 0.5, last_mask_update=44, steps_per_epoch=10) == 5
    assert lf.start_epoch(8, 0.75, last_mask_update=9, steps_per_epoch=10) == 6
    assert lf.start_epoch(8, 0.0, last_mask_update=None, steps_per_epoch=10) == 0
    assert lf.start_epoch(3, 0.5, last_mask_update=0, steps_per_epoch=10) == 2


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"share": 1.0}, r"share must be a number in \[0, 1\).*share=1.0"),
        ({"share": -0.1}, r"share=-0.1"),
        ({"share": "0.2"}, r"share='0.2'"),
        ({"share": True}, r"share=True"),
        ({"interval": 0}, r"interval must be an int of at least 1.*interval=0"),
        ({"interval": 1.5}, r"interval=1.5"),
        ({"start": 1.5}, r"start=1.5"),
        ({"blocks": [["a"]]}, r"at least two.*blocks=\[\['a'\]\]"),
        ({"blocks": [["a"], []]}, r"blocks=\[\['a'\], \[\]\]"),
        ({"blocks": "ab"}, r"blocks='ab'"),
        ({"blocks": [["a"], ["a", "b"]]}, r"Layers \['a'\] appear in more than one"),
        ({"max_blocks": 1}, r"max_blocks=1"),
    ],
)
def test_bad_options_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lf.LayerFreezing(**kwargs)


def test_planner_rejects_bad_share_and_interval():
    with pytest.raises(ValueError, match=r"share=1.5"):
        lf.plan([1.0, 1.0], 2, 0, 1, 1.5)
    with pytest.raises(ValueError, match=r"interval=0"):
        lf.plan([1.0, 1.0], 2, 0, 0, 0.2)


def test_scheduler_rejects_a_non_freezing_option():
    with pytest.raises(TypeError, match=r"layer_freezing=0.2"):
        elsa_tf.LevelScheduler(2, layer_freezing=0.2)


def test_config_round_trip_keeps_every_argument():
    freezing = lf.LayerFreezing(
        share=0.3, interval=2, start=0.5, blocks=[["a", "b"], ["c"]], max_blocks=3
    )
    back = lf.LayerFreezing.from_config(freezing.get_config())
    assert back == freezing
    assert (back.share, back.interval, back.start, back.max_blocks) == (
        0.3,
        2,
        0.5,
        3,
    )
    assert back.blocks == [["a", "b"], ["c"]]
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(freezing)
    )
    assert again == freezing
    scheduler = elsa_tf.LevelScheduler([3, 2], layer_freezing=freezing)
    restored = elsa_tf.LevelScheduler.from_config(scheduler.get_config())
    assert restored.layer_freezing == freezing
    assert restored.epochs_per_level == [3, 2]
    plain = elsa_tf.LevelScheduler(2).get_config()
    assert "layer_freezing" not in plain
    assert elsa_tf.LevelScheduler.from_config(plain).layer_freezing is None


# -- blocks -------------------------------------------------------------------------


def _names(blocks):
    return [list(block.layers) for block, _ in blocks]


def test_split_of_a_sequential_model():
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, name="d1"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(name="relu"),
            keras.layers.Dense(16, name="d2"),
            keras.layers.Dense(3, name="out"),
        ]
    )
    blocks = lf.split_blocks(model, max_blocks=8)
    assert _names(blocks) == [["d1", "bn", "relu"], ["d2"], ["out"]]
    # Forward multiply-adds per example: d1 8*16 + BN and ReLU one per value.
    assert blocks[0][0].forward == 8 * 16 + 16 + 16 + 16
    assert blocks[1][0].forward == 16 * 16 + 16
    assert blocks[2][0].forward == 16 * 3 + 3
    # Grouped by cost into at most 2.
    assert _names(lf.split_blocks(model, max_blocks=2)) == [
        ["d1", "bn", "relu"],
        ["d2", "out"],
    ]


def _residual_model():
    inputs = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    for b in (1, 2):
        y = keras.layers.Conv2D(4, 3, padding="same", name=f"b{b}_conv1")(h)
        y = keras.layers.ReLU(name=f"b{b}_relu1")(y)
        y = keras.layers.Conv2D(4, 3, padding="same", name=f"b{b}_conv2")(y)
        h = keras.layers.Add(name=f"b{b}_add")([h, y])
        h = keras.layers.ReLU(name=f"b{b}_relu")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = keras.layers.Dense(3, name="logits")(h)
    return keras.Model(inputs, outputs)


def test_split_never_cuts_a_residual_block():
    blocks = lf.split_blocks(_residual_model(), max_blocks=8)
    assert _names(blocks) == [
        ["stem"],
        ["b1_conv1", "b1_relu1", "b1_conv2", "b1_add", "b1_relu"],
        ["b2_conv1", "b2_relu1", "b2_conv2", "b2_add", "b2_relu", "pool"],
        ["logits"],
    ]
    for max_blocks in (2, 3, 4):
        names = _names(lf.split_blocks(_residual_model(), max_blocks=max_blocks))
        assert len(names) <= max_blocks
        for b in (1, 2):
            # Each residual block's layers lie in one block.
            holding = {
                i for i, block in enumerate(names) for n in block if f"b{b}_" in n
            }
            assert len(holding) == 1, names


class _Stack(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(16, name="first")
        self.second = keras.layers.Dense(16, name="second")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        return self.head(self.second(self.first(x)))


def test_split_of_a_subclassed_model_follows_its_sublayers():
    model = _Stack()
    model(np.zeros((1, 8), "float32"))
    blocks = lf.split_blocks(model, max_blocks=8)
    assert _names(blocks) == [["first"], ["second"], ["head"]]
    # No graph: parameter counts stand in for the cost.
    assert [b.forward for b, _ in blocks] == [8 * 16 + 16, 16 * 16 + 16, 16 * 3 + 3]


def test_given_blocks_are_checked_against_the_model():
    model = _residual_model()
    blocks = lf.split_blocks(model, [["stem", "b1_conv1"], ["logits"]])
    assert _names(blocks) == [["stem", "b1_conv1"], ["logits"]]
    with pytest.raises(ValueError, match=r"does not have: \['nope', 'gone'\]"):
        lf.split_blocks(model, [["stem", "nope"], ["gone"]])
    with pytest.raises(ValueError, match=r"Block \['pool'\] has no trainable"):
        lf.split_blocks(model, [["pool"], ["logits"]])


def test_a_model_with_one_trainable_block_is_refused():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="only")])
    with pytest.raises(ValueError, match=r"1 block\(s\) with trainable kernels"):
        lf.split_blocks(model)


def test_freezer_restores_every_flag_exactly():
    model = _residual_model()
    model.get_layer("b1_conv1").trainable = False
    model.get_layer("stem").bias.trainable = False  # one variable alone
    before = [
        (layer.trainable, [v.trainable for v in layer.weights])
        for layer in model.layers
    ]
    freezer = lf.BlockFreezer([layers for _, layers in lf.split_blocks(model)])
    assert freezer.set_frozen(2) is True
    assert not model.get_layer("stem").trainable
    assert freezer.set_frozen(2) is False
    assert freezer.set_frozen(1) is True
    assert freezer.release() is True
    after = [
        (layer.trainable, [v.trainable for v in layer.weights])
        for layer in model.layers
    ]
    assert after == before
    with pytest.raises(ValueError, match=r"n=5"):
        freezer.set_frozen(5)


# -- inside model.fit ---------------------------------------------------------------


class _Recording(optimizer_lib.FreezingOptimizer):
    """Records the variables each traced step hands the optimizer."""

    def apply(self, grads, trainable_variables=None):
        handed = trainable_variables or self._trainable_variables
        self.handed.append(sorted(v.path for v in handed))
        return super().apply(grads, trainable_variables)


class _Watch(keras.callbacks.Callback):
    """Snapshots at every epoch's start (after the scheduler froze blocks)
    and after its last step; level 0's weights after each epoch's end."""

    def __init__(self, paths):
        super().__init__()
        self.paths = paths
        self.begin, self.end, self.trainable, self.level0 = {}, {}, {}, []
        self.logs = []  # each epoch's, after the scheduler's

    def _values(self):
        o = model_ops.owner(self.model)
        values = {v.path: v.numpy().copy() for v in o.inner_model.variables}
        for w, m in zip(o.prunable_weights, o.level_maps):
            values["map:" + w.path] = m.numpy().copy()
        return values

    def on_epoch_begin(self, epoch, logs=None):
        self.begin[epoch] = self._values()
        self.trainable[epoch] = {v.path for v in self.model.trainable_variables}

    def on_train_batch_end(self, batch, logs=None):
        # After the epoch's last step, before the level's end (its own mask
        # update, in the scheduler's on_epoch_end).
        self.after_steps = self._values()

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs or {}))
        self.end[epoch] = self.after_steps
        o = model_ops.owner(self.model)
        if o.current_level >= 1:  # level 0 is finished
            self.level0.append(o.effective_weights(0))


def _frozen_fit():
    """Two levels of 4 epochs, 2 steps each; masks fixed from step 2 (epoch
    1) on, so blocks freeze from epoch 2: block 0, then blocks 0 and 1."""
    model = elsa_tf.embed(
        cnn_with_bn(),
        sparsities=[0.5, 0.0],
        schedule=elsa_tf.LevelSchedule(end_fraction=0.25),
    )
    optimizer = _Recording(keras.optimizers.Adam(0.01), name="recording")
    optimizer.handed = []
    model.compile(optimizer=optimizer, loss=LOSS)
    freezing = lf.LayerFreezing(
        share=0.9, blocks=[["conv", "bn"], ["hidden"], ["logits"]]
    )
    scheduler = elsa_tf.LevelScheduler(4, layer_freezing=freezing)
    paths = {
        0: {"conv/kernel", "conv/bias", "bn/gamma", "bn/beta"},
        1: {"hidden/kernel", "hidden/bias"},
    }
    watch = _Watch(paths)
    flags = [(v.path, v.trainable) for v in model.variables]
    x, y = image_data(n=32)
    model.fit(x, y, batch_size=16, epochs=8, verbose=0, callbacks=[scheduler, watch])
    return model, scheduler, watch, optimizer, flags


@pytest.fixture(scope="module")
def frozen_fit():
    keras.utils.set_random_seed(0)
    return _frozen_fit()


def test_plan_and_record(frozen_fit):
    _, scheduler, _, _, _ = frozen_fit
    assert [p.frozen for p in scheduler.freezing_plans] == [(0, 0, 1, 2)] * 2
    assert [p.level for p in scheduler.freezing_plans] == [0, 1]
    assert scheduler.freezing_plans[0].start_epoch == 2
    assert 0 < scheduler.freezing_plans[0].planned_share < 1
    assert scheduler.frozen_blocks == [
        (level, epoch, n) for level in (0, 1) for epoch, n in enumerate((0, 0, 1, 2))
    ]


def test_each_epochs_logs_get_its_frozen_count_and_saved_share(frozen_fit):
    _, scheduler, watch, _, _ = frozen_fit
    assert [logs["frozen_blocks"] for logs in watch.logs] == [0, 0, 1, 2] * 2
    shares = [logs["flops_saved"] for logs in watch.logs[:4]]
    assert shares[:2] == [0.0, 0.0] and 0 < shares[2] < shares[3] < 1
    # The plan's share of the level is the mean of its epochs'.
    plan = scheduler.freezing_plans[0]
    assert np.mean(shares) == pytest.approx(plan.planned_share)


def test_frozen_blocks_are_bit_identical_with_fixed_masks(frozen_fit):
    _, _, watch, _, _ = frozen_fit
    conv_and_bn = [
        p for p in watch.begin[2] if p.split(":")[-1].startswith(("conv/", "bn/"))
    ]
    # Moving statistics too: a frozen BatchNormalization runs in inference
    # mode. Level maps of frozen kernels too: no mask update while frozen.
    assert any("moving_mean" in p for p in conv_and_bn)
    assert any(p.startswith("map:") for p in conv_and_bn)
    for epoch in (2, 3, 6, 7):  # block 0 frozen
        for path in conv_and_bn:
            np.testing.assert_array_equal(
                watch.begin[epoch][path], watch.end[epoch][path]
            )
    for epoch in (3, 7):  # block 1 frozen too
        for path in ("hidden/kernel", "hidden/bias", "map:hidden/kernel"):
            np.testing.assert_array_equal(
                watch.begin[epoch][path], watch.end[epoch][path]
            )
    # What still trains does change.
    for epoch in (2, 3):
        assert not np.array_equal(
            watch.begin[epoch]["logits/kernel"],
            watch.end[epoch]["logits/kernel"],
        )
    assert not np.array_equal(
        watch.begin[2]["hidden/kernel"], watch.end[2]["hidden/kernel"]
    )


def test_frozen_variables_are_not_trained_nor_handed_to_the_optimizer(frozen_fit):
    _, _, watch, optimizer, _ = frozen_fit
    for epoch in (2, 6):
        assert not watch.paths[0] & watch.trainable[epoch]
        assert watch.paths[1] <= watch.trainable[epoch]
    for epoch in (3, 7):
        assert not (watch.paths[0] | watch.paths[1]) & watch.trainable[epoch]
    for epoch in (0, 1, 4, 5):
        assert watch.paths[0] | watch.paths[1] <= watch.trainable[epoch]
    # One trace per frozen count and level: what each traced step hands on.
    counts = [len(watch.paths[0] & set(h)) for h in optimizer.handed]
    assert 0 in counts and 4 in counts
    assert any(not (watch.paths[0] | watch.paths[1]) & set(h) for h in optimizer.handed)


def test_a_block_frozen_at_one_level_trains_at_the_next(frozen_fit):
    model, _, watch, _, flags = frozen_fit
    # Temporary: level 1 trains block 0's kernel again (its first epochs; the
    # shared weights, bias and normalization, froze with level 0 for good).
    assert not np.array_equal(
        watch.begin[4]["conv/kernel"], watch.end[5]["conv/kernel"]
    )
    # Permanent: level 0's weights never change once it is finished.
    assert len(watch.level0) == 5  # its last epoch, then every epoch of level 1
    final = model_ops.owner(model).effective_weights(0)
    for snapshot in watch.level0:
        for key, value in snapshot.items():
            np.testing.assert_array_equal(value, final[key])
    # Every flag is back as it was.
    assert [(v.path, v.trainable) for v in model.variables] == flags
    assert all(layer.trainable for layer in model_ops.owner(model).inner_model.layers)


def test_a_resumed_level_freezes_at_once_with_a_fresh_optimizer():
    # Stopped after 3 epochs of level 0, resumed with an optimizer not built
    # yet: its first epoch freezes two blocks, so the scheduler builds the
    # optimizer on every variable first, or level 1 (all blocks trainable)
    # would hand it variables it does not know.
    model = elsa_tf.embed(
        cnn_with_bn(),
        sparsities=[0.5, 0.0],
        schedule=elsa_tf.LevelSchedule(end_fraction=0.25),
    )
    freezing = lf.LayerFreezing(
        share=0.9, blocks=[["conv", "bn"], ["hidden"], ["logits"]]
    )
    x, y = image_data(n=32)
    model.compile(optimizer=elsa_tf.FreezingOptimizer("adam"), loss=LOSS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ends 3 of 4 epochs into level 0"
        model.fit(
            x,
            y,
            batch_size=16,
            epochs=3,
            verbose=0,
            callbacks=[elsa_tf.LevelScheduler(4, layer_freezing=freezing)],
        )
    model.compile(optimizer=elsa_tf.FreezingOptimizer("adam"), loss=LOSS)
    scheduler = elsa_tf.LevelScheduler(4, layer_freezing=freezing)
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=8,
        initial_epoch=3,
        verbose=0,
        callbacks=[scheduler],
    )
    assert scheduler.frozen_blocks == [
        (0, 3, 2),
        (1, 0, 0),
        (1, 1, 0),
        (1, 2, 1),
        (1, 3, 2),
    ]
    assert model_ops.current_level(model) == 2


def test_gated_sparsifiers_freeze_nothing():
    # Their gates, which make the masks, move until the level's end.
    model = elsa_tf.embed(
        cnn_with_bn(),
        [0.5, 0.0],
        sparsifier=elsa_tf.PolarizedGates(granularity="channel"),
        schedule=elsa_tf.LevelSchedule(end_fraction=0.25),
    )
    model.compile(optimizer=elsa_tf.FreezingOptimizer("adam"), loss=LOSS)
    scheduler = elsa_tf.LevelScheduler(
        2, levels=[0], layer_freezing=lf.LayerFreezing(share=0.5, start=0.0)
    )
    x, y = image_data(n=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[scheduler])
    assert scheduler.freezing_plans[0].frozen == (0, 0)
    assert scheduler.freezing_plans[0].start_epoch == 2
