"""One traced train step for every level after the first; exactness kept."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import LOSS, cnn_with_bn, image_data

import elsa_tf
from elsa_tf import compiled_functions, constraints, elsa_model, model_ops
from elsa_tf.experiments import checkpoint


def _fit(model, x, y, **kwargs):
    """`elsa_tf.fit` with this file's defaults: Adam(1e-2), batches of 16."""
    kwargs = {
        "epochs_per_level": 1,
        "optimizer": keras.optimizers.Adam(1e-2),
        "batch_size": 16,
        **kwargs,
    }
    return elsa_tf.fit(model, x, y, loss=LOSS, verbose=0, **kwargs)


@pytest.fixture
def traced_levels(monkeypatch):
    """The level of every trace of `ElsaModel.train_step`."""
    traces = []
    step = elsa_model.ElsaModel.train_step

    def recording(self, data):
        traces.append(self.traced_level)
        return step(self, data)

    monkeypatch.setattr(elsa_model.ElsaModel, "train_step", recording)
    return traces


@pytest.mark.parametrize(
    "sparsifier, shared, traces",
    [
        # Level 0 trains normalization, later levels run it frozen.
        ("gradual_magnitude", "freeze", [0, 1]),
        ("dpf", "freeze", [0, 1]),
        # Normalization trains at every level: one step for all of them.
        ("gradual_magnitude", "per_level_statistics", [0]),
        ("dpf", "per_level", [0]),
    ],
)
def test_levels_share_traced_steps_and_stay_exact(
    traced_levels, sparsifier, shared, traces
):
    x, y = image_data(n=64)
    model = elsa_tf.embed(
        cnn_with_bn(), [0.9, 0.75, 0.5, 0.0], sparsifier=sparsifier, shared=shared
    )
    snapshots = []

    class Snapshot(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            level = model_ops.current_level(self.model) - 1
            snapshots.append(elsa_tf.extract(self.model, level)(x).numpy())

    # 64 examples in batches of 16: one input shape, so no retrace for it.
    _fit(model, x, y, epochs_per_level=[2, 1, 1, 1], callbacks=[Snapshot()])
    assert sorted(set(traced_levels)) == traces
    # The first step is traced twice (the optimizer makes its variables in
    # the first call), every later one once.
    assert len(traced_levels) == len(traces) + 1
    # Read from a variable, the level still decides what each step may
    # change: every finished level computes as it did when it finished.
    for level, snapshot in enumerate(snapshots):
        out = elsa_tf.extract(model, level)(x).numpy()
        np.testing.assert_array_equal(out, snapshot)
    sparsities = [r["achieved_sparsity"] for r in elsa_tf.summary(model)]
    np.testing.assert_allclose(sparsities, [0.9, 0.75, 0.5, 0.0], atol=0.01)


def test_an_optimizer_configured_alike_is_reset_not_recompiled():
    x, y = image_data(n=32)
    model = elsa_tf.embed(cnn_with_bn(), [0.75, 0.5, 0.0])
    seen = []

    class Optimizer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            inner = self.model.optimizer.inner_optimizer
            seen.append((self.model.optimizer, int(inner.iterations.numpy())))

    _fit(model, x, y, callbacks=[Optimizer()])
    # The same optimizer throughout, back at its just-built state (no step
    # taken) at the start of every level.
    assert len({id(o) for o, _ in seen}) == 1
    assert [steps for _, steps in seen] == [0, 0, 0]


def test_an_optimizer_configured_otherwise_is_compiled_anew():
    x, y = image_data(n=32)
    model = elsa_tf.embed(cnn_with_bn(), [0.75, 0.5, 0.0])
    rates = iter([1e-2, 1e-2, 1e-3])
    optimizers = []

    class Optimizer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            optimizers.append(self.model.optimizer)

    _fit(
        model,
        x,
        y,
        optimizer=lambda: keras.optimizers.Adam(next(rates)),
        callbacks=[Optimizer()],
    )
    assert optimizers[0] is optimizers[1]
    assert optimizers[2] is not optimizers[1]
    assert float(optimizers[2].learning_rate.numpy()) == pytest.approx(1e-3)


class _NoConfigSchedule(keras.optimizers.schedules.LearningRateSchedule):
    def __call__(self, step):
        return 1e-2


def test_a_schedule_without_a_config_is_compiled_anew_each_level():
    x, y = image_data(n=32)
    model = elsa_tf.embed(cnn_with_bn(), [0.5, 0.0])
    histories = _fit(
        model, x, y, optimizer=lambda: keras.optimizers.Adam(_NoConfigSchedule())
    )
    assert len(histories) == 2


def test_a_resumed_level_is_followed_by_this_calls_loss():
    x, y = image_data(n=32)
    model = elsa_tf.embed(cnn_with_bn(), [0.5, 0.0])
    saved = elsa_tf.FreezingOptimizer(keras.optimizers.Adam(1e-2))
    saved_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=saved, loss=saved_loss)  # as loaded from a checkpoint
    losses = []

    class Loss(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            losses.append(self.model._compile_config.config["loss"])

    _fit(model, x, y, epochs_per_level=2, initial_epoch=1, callbacks=[Loss()])
    # The resumed level keeps its saved compile; the next one gets LOSS.
    assert losses[0] is saved_loss and losses[1] is LOSS


def test_frozen_shared_weights_count_no_gradient_after_level_0():
    level = {"now": 0}
    rule = constraints.FrozenAfterFirstLevel(lambda: tf.constant(level["now"]))
    grad = tf.constant([1.0, -2.0])
    np.testing.assert_array_equal(rule.gradient(grad), [1.0, -2.0])
    np.testing.assert_array_equal(rule(tf.constant([0.0, 0.0]), grad), [1.0, -2.0])
    level["now"] = 1
    np.testing.assert_array_equal(rule.gradient(grad), [0.0, 0.0])
    np.testing.assert_array_equal(rule(tf.constant([5.0, 6.0]), grad), [5.0, 6.0])


def test_switch_keeps_a_function_per_key_and_forgets_them_on_compile():
    model = elsa_tf.embed(cnn_with_bn(), [0.5, 0.0])
    model.compile(optimizer=elsa_tf.FreezingOptimizer("adam"), loss=LOSS)
    first = object()
    model.train_function = first
    compiled_functions.switch(model)  # records `first` under level 0's key
    model.train_function = first
    elsa_tf.finish_level(model)  # level 1: a new key, nothing kept for it
    assert model.train_function is None
    second = object()
    model.train_function = second
    model.inner_model.get_layer("conv").trainable = False  # another key
    compiled_functions.switch(model)
    assert model.train_function is None
    model.inner_model.get_layer("conv").trainable = True
    compiled_functions.switch(model)
    assert model.train_function is second
    model.compile(optimizer=elsa_tf.FreezingOptimizer("adam"), loss=LOSS)
    compiled_functions.switch(model)
    assert model.train_function is None


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_checkpointer_counts_training_time_not_validation(tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(checkpoint.time, "perf_counter", clock)
    model = elsa_tf.embed(cnn_with_bn(), [0.5, 0.0])
    saver = checkpoint.Checkpointer(tmp_path, train_seconds=1.0)
    saver.set_model(model)
    saver.on_epoch_begin(0)
    clock.now = 3.0
    saver.on_test_begin()  # fit validates at the end of the epoch
    clock.now = 10.0
    saver.on_test_end()
    clock.now = 12.0
    saver.on_epoch_end(0)  # the level's end, then the save
    assert saver.train_seconds == pytest.approx(1.0 + 3.0 + 2.0)
    clock.now = 20.0
    saver.on_test_begin()  # an evaluation outside an epoch counts nothing
    saver.on_test_end()
    assert saver.train_seconds == pytest.approx(6.0)
    assert checkpoint.latest(tmp_path)["train_seconds"] == pytest.approx(6.0)
