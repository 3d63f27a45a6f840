"""elsa_tf.fit, LevelScheduler and FreezingOptimizer: equivalences and errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import LOSS, cnn_with_bn, image_data, mlp, vector_data

import elsa_tf
from elsa_tf import model_ops

SPARSITIES = [0.8, 0.5, 0.0]


def _fresh(seed_model):
    """An embedded copy with fixed weights, so that runs can be compared."""
    return elsa_tf.embed(seed_model, SPARSITIES)


def _fit(model, levels=None, **kwargs):
    x, y = image_data()
    return elsa_tf.fit(
        model,
        x,
        y,
        levels=levels,
        epochs_per_level=2,
        optimizer=keras.optimizers.Adam(0.01),
        loss=LOSS,
        batch_size=32,
        shuffle=False,
        verbose=0,
        **kwargs,
    )


def _predictions(model):
    x, _ = image_data()
    return [
        elsa_tf.extract(model, k).predict(x, verbose=0) for k in range(len(SPARSITIES))
    ]


def test_split_calls_train_like_one_call():
    base = cnn_with_bn()
    one = _fresh(base)
    histories = _fit(one)
    assert len(histories) == 3
    split = _fresh(base)
    _fit(split, levels=[0])
    _fit(split, levels=[1, 2])
    for a, b in zip(_predictions(one), _predictions(split)):
        np.testing.assert_allclose(a, b, atol=1e-5)


class _SaveAt(keras.callbacks.Callback):
    """Saves the model after `epochs` epochs of `level`, as a checkpoint would."""

    def __init__(self, path, level, epochs):
        super().__init__()
        self.path, self.level, self.epochs = path, level, epochs

    def on_epoch_begin(self, epoch, logs=None):
        self._level = model_ops.current_level(self.model)

    def on_epoch_end(self, epoch, logs=None):
        if self._level == self.level and epoch + 1 == self.epochs:
            self.model.save(self.path)


@pytest.mark.parametrize("interrupted_after", [1, 2])
def test_resuming_mid_level_trains_like_an_uninterrupted_run(
    tmp_path, interrupted_after
):
    base = cnn_with_bn()
    reference = _fresh(base)
    path = tmp_path / "checkpoint.keras"
    _fit(reference, callbacks=[_SaveAt(path, 1, interrupted_after)])
    # epochs_per_level=2 in _fit: interrupted_after=2 stops right at the end
    # of level 1, which the checkpoint already records as finished.
    resumed = keras.saving.load_model(path)
    level = model_ops.current_level(resumed)
    assert level == (1 if interrupted_after == 1 else 2)
    frozen = elsa_tf.extract(resumed, 0).predict(image_data()[0], verbose=0)
    _fit(resumed, levels=list(range(level, 3)), initial_epoch=interrupted_after % 2)
    np.testing.assert_array_equal(_predictions(resumed)[0], frozen)
    for a, b in zip(_predictions(reference), _predictions(resumed)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_plain_model_fit_with_scheduler_matches_elsa_fit():
    base = cnn_with_bn()
    reference = _fresh(base)
    _fit(reference)
    plain = _fresh(base)
    plain.compile(
        optimizer=elsa_tf.FreezingOptimizer(keras.optimizers.Adam(0.01)), loss=LOSS
    )
    x, y = image_data()
    plain.fit(
        x,
        y,
        epochs=2 * len(SPARSITIES),
        batch_size=32,
        shuffle=False,
        verbose=0,
        # elsa_tf.fit re-estimates BatchNormalization on its x by default.
        callbacks=[elsa_tf.LevelScheduler(epochs_per_level=2, recalibration_data=x)],
    )
    assert model_ops.current_level(plain) == len(SPARSITIES)
    for a, b in zip(_predictions(reference), _predictions(plain)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_plain_model_fit_resumes_at_its_initial_epoch(tmp_path):
    """A run saved 3 epochs in (level 1, 1 epoch into it) resumed by
    `model.fit(initial_epoch=3)`, as `keras.callbacks.BackupAndRestore` does."""
    x, y = image_data()
    path = tmp_path / "checkpoint.keras"

    class SaveAfterEpoch3(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                self.model.save(path)

    def plain_fit(model, initial_epoch, callbacks=()):
        model.fit(
            x,
            y,
            epochs=2 * len(SPARSITIES),
            initial_epoch=initial_epoch,
            batch_size=32,
            shuffle=False,
            verbose=0,
            callbacks=[elsa_tf.LevelScheduler(epochs_per_level=2), *callbacks],
        )

    reference = _fresh(cnn_with_bn())
    reference.compile(
        optimizer=elsa_tf.FreezingOptimizer(keras.optimizers.Adam(0.01)), loss=LOSS
    )
    plain_fit(reference, 0, [SaveAfterEpoch3()])
    resumed = keras.saving.load_model(path)
    assert model_ops.current_level(resumed) == 1
    plain_fit(resumed, 3)
    assert model_ops.current_level(resumed) == len(SPARSITIES)
    for a, b in zip(_predictions(reference), _predictions(resumed)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_scheduler_stops_after_the_last_level():
    model = _fresh(cnn_with_bn())
    model.compile(
        optimizer=elsa_tf.FreezingOptimizer(keras.optimizers.Adam()), loss=LOSS
    )
    x, y = image_data()
    history = model.fit(
        x,
        y,
        epochs=50,
        verbose=0,
        callbacks=[elsa_tf.LevelScheduler(epochs_per_level=1)],
    )
    assert len(history.history["loss"]) == len(SPARSITIES)


def test_fit_accepts_a_dataset_and_an_optimizer_factory():
    x, y = image_data()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model = _fresh(cnn_with_bn())
    made = []

    def factory():
        made.append(keras.optimizers.SGD(0.1, momentum=0.9))
        return made[-1]

    elsa_tf.fit(
        model, data, epochs_per_level=1, optimizer=factory, loss=LOSS, verbose=0
    )
    assert len(made) == 3 and len({id(o) for o in made}) == 3
    assert model_ops.current_level(model) == 3


def test_dataset_of_unknown_length_needs_steps_per_epoch():
    x, y = image_data()
    data = (
        tf.data.Dataset.from_tensor_slices((x, y)).batch(16).filter(lambda a, b: True)
    )
    model = _fresh(cnn_with_bn())
    with pytest.raises(ValueError, match="steps_per_epoch"):
        elsa_tf.fit(
            model, data, epochs_per_level=1, optimizer="adam", loss=LOSS, verbose=0
        )
    elsa_tf.fit(
        model,
        data.repeat(),
        epochs_per_level=1,
        optimizer=keras.optimizers.Adam(),
        loss=LOSS,
        steps_per_epoch=3,
        verbose=0,
    )
    assert model_ops.current_level(model) == 3


@pytest.mark.parametrize("kind", ["polynomial_decay", "constant"])
@pytest.mark.parametrize("selection", ["per_layer", "global"])
def test_achieved_sparsity_is_within_half_a_point(kind, selection):
    x, y = vector_data(n=64, features=40)
    base = keras.Sequential(
        [keras.Input((40,)), keras.layers.Dense(50), keras.layers.Dense(3)]
    )
    sparsities = [0.97, 0.9, 0.6, 0.25]
    model = elsa_tf.embed(base, sparsities, schedule=kind, selection=selection)
    elsa_tf.fit(
        model,
        x,
        y,
        epochs_per_level=2,
        optimizer=keras.optimizers.Adam(0.01),
        loss=LOSS,
        batch_size=8,
        verbose=0,
    )
    for row in elsa_tf.summary(model):
        assert abs(row["achieved_sparsity"] - row["target_sparsity"]) <= 0.005


def test_pruning_is_gradual_and_frozen_weights_are_never_candidates():
    x, y = vector_data(n=64, features=40)
    base = keras.Sequential(
        [keras.Input((40,)), keras.layers.Dense(50), keras.layers.Dense(3)]
    )
    model = elsa_tf.embed(base, [0.9, 0.5])
    kept_during_level_1 = []

    class Watch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            kept_during_level_1.append(elsa_tf.summary(model)[1]["kept"])

    elsa_tf.fit(
        model,
        x,
        y,
        levels=[0],
        epochs_per_level=3,
        optimizer=keras.optimizers.Adam(0.01),
        loss=LOSS,
        batch_size=8,
        verbose=0,
    )
    level0 = [m.numpy() <= 0 for m in model_ops.owner(model).level_maps]
    elsa_tf.fit(
        model,
        x,
        y,
        levels=[1],
        epochs_per_level=3,
        callbacks=[Watch()],
        optimizer=keras.optimizers.Adam(0.01),
        loss=LOSS,
        batch_size=8,
        verbose=0,
    )
    assert kept_during_level_1[0] > kept_during_level_1[-1]  # gradual, from dense
    assert kept_during_level_1 == sorted(kept_during_level_1, reverse=True)
    after = [m.numpy() for m in model_ops.owner(model).level_maps]
    for frozen, level_map in zip(level0, after):
        assert np.all(level_map[frozen] == 0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"levels": [3]}, ValueError, r"levels=3"),
        ({"levels": [-1]}, ValueError, r"levels=-1"),
        ({"levels": [1]}, ValueError, r"expected levels=\[0\].*levels=\[1\]"),
        ({"levels": []}, ValueError, r"levels=\[\]"),
        ({"epochs_per_level": 0}, ValueError, "epochs_per_level=0"),
        ({"epochs_per_level": 1.5}, ValueError, "epochs_per_level=1.5"),
        ({"optimizer": 42}, TypeError, "optimizer=42"),
        ({"optimizer": "nope"}, ValueError, "nope"),
        ({"optimizer": keras.optimizers.Adam}, TypeError, "optimizer="),
        ({"epochs": 3}, TypeError, "epochs=3"),
        ({"initial_epoch": 1, "epochs_per_level": 2}, ValueError, "compiled with"),
        ({"initial_epoch": 2, "epochs_per_level": 2}, ValueError, "initial_epoch=2"),
        ({"initial_epoch": -1}, ValueError, "initial_epoch=-1"),
    ],
)
def test_fit_rejects_bad_arguments(kwargs, error, message):
    model = elsa_tf.embed(mlp(), [0.5, 0.2, 0.0])
    before = [w.copy() for w in model.get_weights()]
    x, y = vector_data()
    args = {"epochs_per_level": 1, "optimizer": keras.optimizers.Adam(), "loss": LOSS}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        elsa_tf.fit(model, x, y, verbose=0, **args)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_training_a_finished_level_is_refused():
    model = elsa_tf.embed(mlp(), [0.5, 0.0])
    x, y = vector_data()
    elsa_tf.fit(
        model,
        x,
        y,
        levels=[0],
        epochs_per_level=1,
        optimizer=keras.optimizers.Adam(),
        loss=LOSS,
        verbose=0,
    )
    with pytest.raises(ValueError, match=r"Level 0 is already finished.*levels=\[0\]"):
        elsa_tf.fit(
            model,
            x,
            y,
            levels=[0],
            epochs_per_level=1,
            optimizer=keras.optimizers.Adam(),
            loss=LOSS,
            verbose=0,
        )
    elsa_tf.fit(
        model,
        x,
        y,
        epochs_per_level=1,
        optimizer=keras.optimizers.Adam(),
        loss=LOSS,
        verbose=0,
    )
    with pytest.raises(ValueError, match="already finished"):
        elsa_tf.fit(
            model,
            x,
            y,
            epochs_per_level=1,
            optimizer=keras.optimizers.Adam(),
            loss=LOSS,
            verbose=0,
        )


def test_freezing_optimizer_reset_restores_a_fresh_state():
    model = elsa_tf.embed(mlp(), [0.5, 0.0])
    optimizer = elsa_tf.FreezingOptimizer(keras.optimizers.Adagrad(0.1))
    model.compile(optimizer=optimizer, loss=LOSS)
    x, y = vector_data()
    model.fit(x, y, epochs=1, verbose=0)
    assert int(optimizer.iterations) > 0
    optimizer.reset()
    fresh = keras.optimizers.Adagrad(0.1)
    fresh.build(model.trainable_variables)
    for a, b in zip(optimizer.inner_optimizer.variables, fresh.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_freezing_optimizer_rejects_non_optimizers():
    with pytest.raises(TypeError, match="inner_optimizer=3"):
        elsa_tf.FreezingOptimizer(3)
    with pytest.raises(ValueError, match="nadamw"):
        elsa_tf.FreezingOptimizer("nadamw")


def test_training_without_the_scheduler_still_trains_at_the_level():
    # A plain optimizer moves pruned weights; training must still mask them,
    # so that training-mode and inference-mode outputs agree.
    x, y = vector_data()
    model = elsa_tf.embed(mlp(), [0.8, 0.0])
    model_ops.prune_to(model, 0.8)
    model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), loss=LOSS)
    model.fit(x, y, epochs=2, verbose=0)
    np.testing.assert_allclose(
        model(x, training=True), model(x, training=False), atol=1e-6
    )
    assert elsa_tf.summary(model)[0]["achieved_sparsity"] >= 0.795
