"""get_config / from_config round trips, saving, loading and storage cost."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import LOSS, cnn_with_bn, digits_cnn, image_data, mlp

import elsa_tf
from elsa_tf import model_ops


def _config_round_trip(obj):
    config = keras.saving.serialize_keras_object(obj)
    return keras.saving.deserialize_keras_object(config)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"prune": [1]},
        {"shared": "per_level"},
        {"shared": "per_level_statistics"},
        {"selection": "global"},
        {"block_shape": [4, 1]},
        {"schedule": elsa_tf.LevelSchedule("constant", end_fraction=0.5, frequency=3)},
        {"sparsifier": elsa_tf.DynamicPruningWithFeedback(8, carry="feedback")},
        {"name": "custom_name"},
    ],
)
def test_elsa_model_config_round_trip_keeps_every_argument(kwargs):
    model = elsa_tf.ElsaModel(mlp(), [0.9, 0.5, 0.0], **kwargs)
    clone = _config_round_trip(model)
    assert clone.get_config() == model.get_config()
    assert clone.sparsities == (0.9, 0.5, 0.0)
    assert type(clone.inner_model) is type(model.inner_model)
    for key, value in kwargs.items():
        if key in ("selection", "block_shape"):  # options of the sparsifier
            assert clone.get_config()["sparsifier"]["config"][key] == value
        elif key in ("schedule", "sparsifier"):
            assert clone.get_config()[key] == keras.saving.serialize_keras_object(value)
        else:
            assert clone.get_config()[key] == value


def test_a_config_of_elsa_tf_0_2_0_loads_with_its_selection_and_blocks():
    model = elsa_tf.ElsaModel(mlp(), [0.9, 0.0])
    config = model.get_config()
    del config["sparsifier"]
    config.update(selection="global", block_shape=[4, 1])  # as 0.2.0 wrote it
    old = elsa_tf.ElsaModel.from_config(config)
    assert old.sparsifier == elsa_tf.GradualMagnitude("global", (4, 1))


def test_schedule_config_round_trip_keeps_every_argument():
    schedule = elsa_tf.LevelSchedule(
        "constant", power=2.0, begin_fraction=0.1, end_fraction=0.6, frequency=7
    )
    assert _config_round_trip(schedule) == schedule


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "cubic"}, "kind='cubic'"),
        ({"begin_fraction": 0.8, "end_fraction": 0.5}, "end_fraction=0.5"),
        ({"frequency": 0}, "frequency=0"),
        ({"power": 0}, "power=0"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        elsa_tf.LevelSchedule(**kwargs)


def test_schedule_reaches_the_target_on_an_aligned_step():
    schedule = elsa_tf.LevelSchedule(end_fraction=0.75)
    begin, end, frequency = schedule.steps(103)
    assert (end - begin) % frequency == 0 and end <= 0.75 * 103
    tfmot_schedule = schedule.build(0.8, 103)
    should_prune, sparsity = tfmot_schedule(end)
    assert bool(should_prune) and abs(float(sparsity) - 0.8) < 1e-6


def test_building_a_schedule_leaves_tf_keras_alone():
    # tfmot sets TF_USE_LEGACY_KERAS on its first import: check in a fresh process.
    code = (
        "import os, elsa_tf; elsa_tf.LevelSchedule().build(0.5, 100); "
        "import tensorflow_model_optimization; "
        "print(os.environ.get('TF_USE_LEGACY_KERAS'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "None"


def test_optimizer_config_round_trip_keeps_every_argument():
    optimizer = elsa_tf.FreezingOptimizer(
        keras.optimizers.AdamW(3e-3, weight_decay=0.1), name="freezer"
    )
    clone = _config_round_trip(optimizer)
    assert clone.name == "freezer"
    assert clone.inner_optimizer.get_config() == optimizer.inner_optimizer.get_config()


def test_scheduler_config_round_trip_keeps_every_argument():
    scheduler = elsa_tf.LevelScheduler(3, levels=[1, 2], steps_per_epoch=10)
    clone = elsa_tf.LevelScheduler.from_config(scheduler.get_config())
    assert clone.get_config() == {
        "epochs_per_level": 3,
        "levels": [1, 2],
        "steps_per_epoch": 10,
    }


@pytest.mark.parametrize("shared", ["freeze", "per_level", "per_level_statistics"])
def test_save_mid_training_then_continue(tmp_path, shared):
    x, y = image_data()
    model = elsa_tf.embed(cnn_with_bn(), [0.8, 0.5, 0.0], shared=shared)
    elsa_tf.fit(
        model,
        x,
        y,
        levels=[0],
        epochs_per_level=2,
        optimizer=keras.optimizers.Adam(0.01),
        loss=LOSS,
        verbose=0,
    )
    level0 = elsa_tf.extract(model, 0).predict(x, verbose=0)
    path = tmp_path / "embedded.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert model_ops.current_level(loaded) == 1
    assert elsa_tf.summary(loaded) == elsa_tf.summary(model)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    assert isinstance(loaded.optimizer, elsa_tf.FreezingOptimizer)
    elsa_tf.fit(
        loaded,
        x,
        y,
        epochs_per_level=2,
        optimizer=keras.optimizers.Adam(0.01),
        loss=LOSS,
        verbose=0,
    )
    assert model_ops.current_level(loaded) == 3
    np.testing.assert_allclose(
        elsa_tf.extract(loaded, 0).predict(x, verbose=0), level0, atol=1e-6, rtol=0
    )


def _mlp():
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(300, activation="relu"),
            keras.layers.Dense(100, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


@pytest.mark.parametrize("build", [_mlp, digits_cnn])
def test_level_maps_cost_one_byte_per_weight_and_the_file_stays_small(tmp_path, build):
    base = build()
    model = elsa_tf.embed(base, [0.95, 0.9, 0.75, 0.5, 0.0])
    owner = model_ops.owner(model)
    prunable = sum(int(np.prod(w.shape)) for w in owner.prunable_weights)
    map_bytes = sum(
        int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in owner.level_maps
    )
    assert map_bytes == prunable
    extra = [v for v in model.weights if "level_map" not in v.path]
    assert sum(int(np.prod(v.shape)) for v in extra) < 1.01 * base.count_params()
    base.save(tmp_path / "plain.keras")
    model.save(tmp_path / "embedded.keras")
    ratio = os.path.getsize(tmp_path / "embedded.keras") / os.path.getsize(
        tmp_path / "plain.keras"
    )
    assert ratio <= 1.3, ratio


def test_compiled_embedded_model_file_stays_small_and_extract_is_plain(tmp_path):
    x, y = image_data(num_classes=10)
    base = digits_cnn()
    base.compile(optimizer=keras.optimizers.Adam(), loss=LOSS)
    base.fit(x, y, epochs=1, verbose=0)
    model = elsa_tf.embed(base, [0.95, 0.9, 0.75, 0.5, 0.0])
    assert not model.compiled
    elsa_tf.fit(
        model,
        x,
        y,
        epochs_per_level=1,
        optimizer=keras.optimizers.Adam(),
        loss=LOSS,
        verbose=0,
    )
    level = elsa_tf.extract(model, 0)
    assert not level.compiled
    base.save(tmp_path / "plain.keras")
    model.save(tmp_path / "embedded.keras")
    ratio = os.path.getsize(tmp_path / "embedded.keras") / os.path.getsize(
        tmp_path / "plain.keras"
    )
    # Adam state triples the plain file; the level maps add a quarter of the
    # kernels; the optimizer state must not be stored twice.
    assert ratio <= 1.3, ratio
    loaded = keras.saving.load_model(tmp_path / "embedded.keras")
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_file_saved_by_version_0_1_is_refused_naming_the_version():
    # Written by elsa_tf 0.1.0 (per-layer ElsaWrapper) from a 4-3-2 MLP.
    path = os.path.join(os.path.dirname(__file__), "data", "elsa_0.1_mlp.keras")
    with pytest.raises(Exception, match=r"saved by elsa_tf 0\.1.*elsa_tf 0\.2"):
        keras.saving.load_model(path)


def test_a_file_saved_by_version_0_2_0_loads_and_keeps_training():
    # Written by elsa_tf 0.2.0 (commit 67c0d77, no sparsifier object, no
    # reactivation counts): an 8-16-BN-3 MLP embedded with per-layer
    # selection and 2x1 blocks, levels 0 and 1 trained; level predictions on
    # the first 8 inputs of the seed-0 normal data saved beside it.
    data = os.path.join(os.path.dirname(__file__), "data")
    loaded = keras.saving.load_model(os.path.join(data, "elsa_0.2.0_mlp.keras"))
    assert loaded.sparsifier == elsa_tf.GradualMagnitude("per_layer", (2, 1))
    assert loaded.current_level == 2
    assert loaded.reactivations.numpy().tolist() == [0, 0, 0]
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    want = np.load(os.path.join(data, "elsa_0.2.0_mlp_predictions.npy"))
    for k in range(2):
        got = elsa_tf.extract(loaded, k).predict(x[:8], verbose=0)
        np.testing.assert_allclose(got, want[k], atol=1e-6)
    y = np.random.default_rng(1).integers(0, 3, 64)
    elsa_tf.fit(
        loaded, x, y, epochs_per_level=1, optimizer="adam", loss=LOSS, verbose=0
    )
    assert [r["status"] for r in elsa_tf.summary(loaded)] == ["finished"] * 3
    np.testing.assert_allclose(
        elsa_tf.extract(loaded, 0).predict(x[:8], verbose=0), want[0], atol=1e-6
    )


@keras.saving.register_keras_serializable(package="elsa_tf_test")
class _SlowStart(elsa_tf.LevelSchedule):
    """A user's schedule subclass."""


def test_a_schedule_subclass_comes_back_from_a_file(tmp_path):
    model = elsa_tf.embed(mlp(), [0.5, 0.0], schedule=_SlowStart("constant"))
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(loaded.schedule) is _SlowStart
    assert loaded.schedule == model.schedule
