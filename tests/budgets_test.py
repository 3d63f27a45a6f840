"""Level budgets: `epochs_per_level` as a list, and `budgets.front_loaded`."""

import json
import warnings

import keras
import numpy as np
import pytest
from conftest import LOSS, mlp, run_readme_block, vector_data

import elsa_tf
from elsa_tf import budgets, model_ops


def test_front_loaded_by_hand():
    # The sparsest level gets a separate model's 6 epochs, every later one
    # half of them.
    assert budgets.front_loaded(6, 4) == [6, 3, 3, 3]
    assert budgets.front_loaded(6, 1) == [6]
    assert budgets.front_loaded(5, 3) == [5, 3, 3]  # 2.5 rounds up
    # Halving from level to level; never below one epoch.
    assert budgets.front_loaded(6, 4, decay=0.5) == [6, 3, 2, 1]
    assert budgets.front_loaded(10, 4, decay=0.5) == [10, 5, 3, 1]
    assert budgets.front_loaded(6, 4, later=0.1) == [6, 1, 1, 1]
    assert budgets.front_loaded(6, 3, later=1.0) == [6, 6, 6]
    with pytest.raises(TypeError):
        budgets.front_loaded(6, 4, 0.33)  # keyword-only: no silent misreading


@pytest.mark.parametrize("epochs", [1, 2, 6, 15, 30])
@pytest.mark.parametrize("num_levels", [2, 3, 4, 5])
@pytest.mark.parametrize("later, decay", [(0.5, 1.0), (0.5, 0.5), (0.3, 0.8)])
def test_front_loaded_is_non_increasing_from_the_full_epochs(
    epochs, num_levels, later, decay
):
    budget = budgets.front_loaded(epochs, num_levels, later=later, decay=decay)
    assert len(budget) == num_levels and min(budget) >= 1
    assert budget[0] == epochs
    assert all(a >= b for a, b in zip(budget, budget[1:]))
    # Each later level within half an epoch of its share (or at 1).
    for k, e in enumerate(budget[1:]):
        assert e == 1 or abs(e - epochs * later * decay**k) <= 0.5


def test_level_epochs():
    assert budgets.level_epochs(3, 2) == [3, 3]
    assert budgets.level_epochs([4, 1], 2) == [4, 1]
    assert budgets.level_epochs(np.array([2, 1]), 2) == [2, 1]


@pytest.mark.parametrize(
    "value, match",
    [
        (0, "epochs_per_level=0"),
        (True, "epochs_per_level=True"),
        ("3", "epochs_per_level='3'"),
        ([], r"epochs_per_level=\[\]"),
        ([2, 0], r"epochs_per_level=\[2, 0\]"),
        ([2, 1.5], r"epochs_per_level=\[2, 1.5\]"),
        ([2, 1, 1], r"3 entries for a model of 2 levels.*\[2, 1, 1\]"),
    ],
)
def test_bad_budgets_name_the_value(value, match):
    with pytest.raises(ValueError, match=match):
        budgets.level_epochs(value, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epochs=0, num_levels=2), "epochs=0"),
        (dict(epochs=2, num_levels=0), "num_levels=0"),
        (dict(epochs=2, num_levels=2, later=0.0), "later=0.0"),
        (dict(epochs=2, num_levels=2, later=1.5), "later=1.5"),
        (dict(epochs=2, num_levels=2, decay=-1), "decay=-1"),
        (dict(epochs=2, num_levels=2, decay="1"), "decay='1'"),
    ],
)
def test_front_loaded_names_a_bad_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        budgets.front_loaded(**kwargs)


class _LevelOfEachEpoch(keras.callbacks.Callback):
    """Records the level being trained at each epoch, and each level's
    number of mask updates, read from the scheduler."""

    def __init__(self):
        super().__init__()
        self.levels = []

    def on_epoch_begin(self, epoch, logs=None):
        self.levels.append(model_ops.current_level(self.model))


def test_fit_trains_each_level_for_its_entry_and_stretches_its_schedule(
    monkeypatch,
):
    x, y = vector_data(n=32)
    model = elsa_tf.embed(mlp(), sparsities=[0.75, 0.5, 0.0])
    lengths = {}
    real = model_ops.mask_update_steps

    def spy(model, level, level_steps):
        lengths[level] = level_steps
        return real(model, level, level_steps)

    monkeypatch.setattr(model_ops, "mask_update_steps", spy)
    seen = _LevelOfEachEpoch()
    histories = elsa_tf.fit(
        model,
        x,
        y,
        epochs_per_level=[3, 2, 1],
        optimizer="adam",
        loss=LOSS,
        batch_size=8,
        verbose=0,
        callbacks=[seen],
    )
    assert [len(h.history["loss"]) for h in histories] == [3, 2, 1]
    assert seen.levels == [0, 0, 0, 1, 1, 2]
    # 4 steps an epoch: each level's schedule spans its own steps.
    assert lengths == {0: 12, 1: 8, 2: 4}
    achieved = [row["achieved_sparsity"] for row in elsa_tf.summary(model)]
    np.testing.assert_allclose(achieved, [0.75, 0.5, 0.0], atol=0.01)


def test_plain_model_fit_with_a_list_and_its_warnings():
    x, y = vector_data(n=32)
    model = elsa_tf.embed(mlp(), sparsities=[0.5, 0.0])
    model.compile(optimizer=elsa_tf.FreezingOptimizer("adam"), loss=LOSS)
    seen = _LevelOfEachEpoch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=3,
            verbose=0,
            callbacks=[elsa_tf.LevelScheduler([2, 3]), seen],
        )
    assert seen.levels == [0, 0, 1]
    messages = [str(w.message) for w in caught]
    assert any(
        "ends 1 of 3 epochs into level 1" in m and "epochs=5" in m for m in messages
    ), messages


def test_a_list_resumes_mid_level_counting_from_the_current_level(tmp_path):
    x, y = vector_data(n=32)
    path = tmp_path / "mid_level.keras"

    class SaveAfter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if model_ops.current_level(self.model) == 1 and epoch == 0:
                self.model.save(path)

    def run(model, levels, initial_epoch, callbacks=()):
        elsa_tf.fit(
            model,
            x,
            y,
            epochs_per_level=[1, 3],
            levels=levels,
            initial_epoch=initial_epoch,
            optimizer=keras.optimizers.Adam(0.01),
            loss=LOSS,
            batch_size=8,
            shuffle=False,
            verbose=0,
            callbacks=list(callbacks),
        )

    keras.utils.set_random_seed(0)
    reference = elsa_tf.embed(mlp(), sparsities=[0.5, 0.0])
    run(reference, None, 0, [SaveAfter()])
    resumed = keras.saving.load_model(path)
    assert model_ops.current_level(resumed) == 1
    run(resumed, None, 1)
    assert model_ops.current_level(resumed) == 2
    for a, b in zip(reference.predict(x, verbose=0), resumed.predict(x, verbose=0)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="initial_epoch=3"):
        run(keras.saving.load_model(path), None, 3)


def test_scheduler_config_round_trips_a_list():
    scheduler = elsa_tf.LevelScheduler([4, 2, 1], levels=[0, 1, 2])
    restored = elsa_tf.LevelScheduler.from_config(scheduler.get_config())
    assert restored.epochs_per_level == [4, 2, 1]
    assert restored.levels == [0, 1, 2]


def test_cli_config_takes_a_list_and_checkpoints_count_each_level(
    tmp_path, monkeypatch
):
    from elsa_tf.experiments import checkpoint
    from elsa_tf.experiments import config as config_lib

    config = config_lib.Config(sparsities=(0.5, 0.0), epochs_per_level=[2, 1])
    assert config.epochs_per_level == (2, 1)
    assert config_lib.Config.from_dict(config.to_dict()) == config
    assert config.to_dict()["epochs_per_level"] == [2, 1]
    with pytest.raises(ValueError, match=r"3 entries for a model of 2 levels"):
        config_lib.Config(sparsities=(0.5, 0.0), epochs_per_level=[2, 1, 1])

    states = []
    monkeypatch.setattr(
        checkpoint, "save", lambda model, directory, state: states.append(state)
    )
    x, y = vector_data(n=16)
    elsa_tf.fit(
        elsa_tf.embed(mlp(), sparsities=[0.5, 0.0]),
        x,
        y,
        epochs_per_level=[2, 1],
        optimizer="adam",
        loss=LOSS,
        batch_size=8,
        verbose=0,
        callbacks=[checkpoint.Checkpointer(tmp_path)],
    )
    assert [(s["level"], s["epoch_in_level"], s["epochs"]) for s in states] == [
        (0, 1, 1),
        (1, 0, 2),
        (2, 0, 3),
    ]


def test_readme_training_for_less_runs_verbatim(tmp_path):
    result = run_readme_block("training-for-less", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    # 512 examples, 20% held out: 410 an epoch, over the [6, 3, 3, 3] budget.
    assert json.loads(lines[-2]) == [[410] * 6, [410] * 3, [410] * 3, [410] * 3]
    frozen = json.loads(lines[-1])
    assert [len(f) for f in frozen] == [6, 3, 3, 3]
    assert max(max(f) for f in frozen) >= 1  # some block froze in level 0
