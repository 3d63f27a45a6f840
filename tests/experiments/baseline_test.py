"""The independent tfmot baseline, on a tiny CNN and 96 8x8 images."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import image_data

import elsa_tf
from elsa_tf import export, prunable
from elsa_tf.experiments import baseline, optimizers, zoo
from elsa_tf.lite import runtime

SPARSITIES = [0.5, 0.0]


class ArrayDataset:
    """The `datasets.Dataset` interface over numpy arrays."""

    def __init__(self, x, y, num_classes=3):
        self.x, self.y = x, y
        self.input_shape = x.shape[1:]
        self.num_classes = num_classes
        self.num_train = self.num_test = len(x)

    def train(self, batch_size, *, seed, augment=True, repeat=False):
        del augment  # Nothing to augment on these inputs.
        data = tf.data.Dataset.from_tensor_slices((self.x, self.y))
        data = data.shuffle(len(self.x), seed=seed, reshuffle_each_iteration=True)
        return data.batch(batch_size)

    def test(self, batch_size):
        return tf.data.Dataset.from_tensor_slices((self.x, self.y)).batch(batch_size)

    def test_arrays(self):
        return self.x, self.y


def _dataset():
    return ArrayDataset(*image_data(n=96))


class Builder:
    """Builds the tiny tf_keras CNN and keeps every model it built: the
    stripped model shares its layers (and weights) with the built one."""

    def __init__(self):
        self.models = []

    def __call__(self):
        import tf_keras

        L = tf_keras.layers
        inputs = tf_keras.Input((8, 8, 1))
        h = L.Conv2D(4, 3, padding="same", name="conv")(inputs)
        h = L.BatchNormalization(name="bn")(h)
        h = L.ReLU(name="relu")(h)
        h = L.MaxPooling2D(name="pool")(h)
        h = L.Flatten(name="flatten")(h)
        h = L.Dense(16, activation="relu", name="hidden")(h)
        outputs = L.Dense(3, name="logits")(h)
        model = tf_keras.Model(inputs, outputs, name="tiny")
        self.models.append(model)
        return model


KERNELS = {"conv": 36, "hidden": 64 * 16, "logits": 16 * 3}


def _train(sparsities=SPARSITIES, builder=None, **kwargs):
    args = {
        "epochs": 2,
        "batch_size": 32,
        "optimizer": optimizers.factory("adam", 1e-2, backend="tf_keras"),
        "schedule": elsa_tf.LevelSchedule(),
        "seed": 0,
        **kwargs,
    }
    builder = builder or Builder()
    return builder, baseline.train_independent(builder, _dataset(), sparsities, **args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("baseline")
    builder, rows = _train(workdir=str(workdir))
    return builder, rows, workdir


def _kernel(model, name):
    return model.get_layer(name).kernel.numpy()


def test_rows(trained):
    _, rows, workdir = trained
    assert [r["level"] for r in rows] == [0, 1]
    assert [r["target_sparsity"] for r in rows] == SPARSITIES
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["train_seconds"] > 0
        assert row["prunable_params"] == sum(KERNELS.values())
        assert row["tflite_path"] == os.path.join(
            str(workdir),
            "baseline",
            export.level_file_name(row["level"], row["target_sparsity"]),
        )
        assert os.path.getsize(row["tflite_path"]) == row["tflite_bytes"]
    assert json.loads(json.dumps(rows)) == rows  # Goes into report.json as is.
    assert rows[0]["sparse_encoding"] and not rows[1]["sparse_encoding"]
    assert rows[0]["tflite_bytes"] < rows[1]["tflite_bytes"]


def test_sparse_model_prunes_every_kernel_to_the_target(trained):
    builder, rows, _ = trained
    pruned_model = builder.models[0]
    for name, size in KERNELS.items():
        zeros = int(np.sum(_kernel(pruned_model, name) == 0))
        assert abs(zeros - size // 2) <= 1, name
    assert rows[0]["achieved_sparsity"] == pytest.approx(
        0.5, abs=3 / sum(KERNELS.values())
    )
    # Biases and batch normalization are not pruned. (A bias starts at zero
    # and stays there only for a unit that never gets a gradient.)
    for layer in ("conv", "hidden", "logits"):
        assert np.mean(pruned_model.get_layer(layer).bias.numpy() == 0) < 0.25
    assert np.all(pruned_model.get_layer("bn").gamma.numpy() != 0)


def test_dense_model_has_no_zeros(trained):
    builder, rows, _ = trained
    assert rows[1]["achieved_sparsity"] == 0.0
    for name in KERNELS:
        assert np.all(_kernel(builder.models[1], name) != 0)


def test_tflite_files_predict_like_the_trained_models(trained):
    builder, rows, _ = trained
    x = _dataset().x[:16]
    for model, row in zip(builder.models, rows):
        with open(row["tflite_path"], "rb") as f:
            got = runtime.predict(runtime.interpreter(f.read()), x)
        want = model(x, training=False).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_same_seed_gives_the_same_models(trained, tmp_path):
    builder, rows, _ = trained
    again, rows_again = _train(sparsities=[0.5], workdir=str(tmp_path))
    for name in KERNELS:
        np.testing.assert_array_equal(
            _kernel(again.models[0], name), _kernel(builder.models[0], name)
        )
    assert rows_again[0]["accuracy"] == rows[0]["accuracy"]
    # The files differ only in names Keras numbers per process (the input's).
    assert rows_again[0]["tflite_bytes"] == rows[0]["tflite_bytes"]
    x = _dataset().x[:16]
    outputs = []
    for row in (rows[0], rows_again[0]):
        with open(row["tflite_path"], "rb") as f:
            outputs.append(runtime.predict(runtime.interpreter(f.read()), x))
    np.testing.assert_array_equal(*outputs)
    other, _ = _train(sparsities=[0.5], seed=1)
    assert not np.array_equal(
        _kernel(other.models[0], "hidden"), _kernel(builder.models[0], "hidden")
    )


def test_keras_3_still_works_after_the_baseline(trained):
    del trained  # Only its side effects on the process matter here.
    assert os.environ.get("TF_USE_LEGACY_KERAS") in (None, "0", "false")
    x, y = image_data(n=32)
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    assert type(model).__module__.startswith("keras.")
    embedded = elsa_tf.embed(model, sparsities=[0.5, 0.0])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    histories = elsa_tf.fit(
        embedded,
        x,
        y,
        epochs_per_level=1,
        optimizer=optimizers.factory("adam", 1e-2),
        loss=loss,
        verbose=0,
    )
    assert all(np.isfinite(h.history["loss"]).all() for h in histories)
    assert elsa_tf.summary(embedded)[0]["achieved_sparsity"] == pytest.approx(
        0.5, abs=0.02
    )
    level = elsa_tf.extract(embedded, 0)
    content = export._convert(level, None, None, True)
    np.testing.assert_allclose(
        runtime.predict(runtime.interpreter(content), x),
        level(x).numpy(),
        rtol=1e-4,
        atol=1e-4,
    )


def _tfmot_pruned(model):
    sparsity = elsa_tf.schedules._tfmot_sparsity()
    wrapped = sparsity.prune_low_magnitude(model)
    return {
        f"{layer.layer.name}/{w.name.split('/')[-1].split(':')[0]}"
        for layer in wrapped.submodules
        for w, _, _ in getattr(layer, "pruning_vars", ())
    }


def _elsa_pruned(model):
    return {
        f"{layer.name}/{w.name}"
        for layer in model.layers
        if prunable.is_prunable(layer)
        for w in prunable.get_prunable_weights(layer)
    }


@pytest.mark.parametrize("name", zoo.MODELS)
def test_tfmot_prunes_what_elsa_prunes_but_depthwise_kernels(name):
    shape = (40,) if name == "cnn1d" else (8, 8, 3)
    model = zoo.build(name, shape, 3)
    depthwise = {
        f"{layer.name}/kernel"  # Keras 3's name for the depthwise kernel.
        for layer in model.layers
        if isinstance(layer, keras.layers.DepthwiseConv2D)
    }
    tfmot = _tfmot_pruned(zoo.build(name, shape, 3, backend="tf_keras"))
    assert tfmot == _elsa_pruned(model) - depthwise
    assert bool(depthwise) == (name == "mobilenetv2")


def test_zoo_model(tmp_path):
    data = _dataset()
    rows = baseline.train_independent(
        lambda: zoo.build(
            "cnn", data.input_shape, data.num_classes, backend="tf_keras"
        ),
        data,
        np.array([0.75]),
        epochs=1,
        batch_size=32,
        optimizer=optimizers.factory("sgd", 0.05, 1e-4, backend="tf_keras"),
        schedule="constant",
        seed=0,
    )
    assert rows[0]["achieved_sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert "tflite_path" not in rows[0]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"sparsities": []}, ValueError, r"Received: sparsities=\[\]"),
        ({"sparsities": [0.5, 1.0]}, ValueError, r"Received: sparsities=\[0.5, 1.0\]"),
        ({"sparsities": [-0.1]}, ValueError, r"Received: sparsities=\[-0.1\]"),
        ({"sparsities": ["0.5"]}, ValueError, r"Received: sparsities=\['0.5'\]"),
        ({"sparsities": 0.5}, ValueError, "Received: sparsities=0.5"),
        ({"sparsities": "0.5"}, ValueError, "Received: sparsities='0.5'"),
        ({"epochs": 0}, ValueError, "Received: epochs=0"),
        ({"epochs": 1.5}, ValueError, "Received: epochs=1.5"),
        ({"batch_size": 0}, ValueError, "Received: batch_size=0"),
        ({"optimizer": "adam"}, TypeError, "Received: optimizer='adam'"),
        ({"schedule": "cosine"}, ValueError, "Received: kind='cosine'"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    args = {
        "sparsities": SPARSITIES,
        "epochs": 1,
        "batch_size": 32,
        "optimizer": optimizers.factory("adam", 1e-2, backend="tf_keras"),
        "schedule": elsa_tf.LevelSchedule(),
        "seed": 0,
        **kwargs,
    }
    builder = Builder()
    with pytest.raises(error, match=message):
        baseline.train_independent(builder, _dataset(), **args)
    assert not builder.models  # Checked before anything is built.


def test_keras_3_model_or_optimizer_is_refused():
    data = _dataset()

    def keras_model():
        return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten()])

    with pytest.raises(TypeError, match=r"tf_keras.Model.*Received: keras\."):
        baseline.train_independent(
            keras_model,
            data,
            [0.5],
            epochs=1,
            batch_size=32,
            optimizer=optimizers.factory("adam", 1e-2, backend="tf_keras"),
            schedule=None,
            seed=0,
        )
    with pytest.raises(TypeError, match=r"tf_keras optimizer.*Received: keras\."):
        baseline.train_independent(
            Builder(),
            data,
            [0.5],
            epochs=1,
            batch_size=32,
            optimizer=optimizers.factory("adam", 1e-2),
            schedule=None,
            seed=0,
        )


def test_independent_elsa_models_train_as_elsa_would(tmp_path):
    """The single-level elsa_tf baseline: one model per sparsity, each trained
    with ELSA's settings, so the sparsest one is ELSA's level 0 exactly."""
    from conftest import LOSS, cnn_with_bn

    data = _dataset()
    started = []
    common = {
        "epochs": 1,
        "batch_size": 32,
        "optimizer": optimizers.factory("adam", 1e-2),
        "schedule": elsa_tf.LevelSchedule(),
        "seed": 0,
        "augment": False,
    }
    rows = baseline.train_independent_elsa(
        cnn_with_bn,
        data,
        SPARSITIES,
        workdir=str(tmp_path),
        on_start=lambda level, target: started.append((level, target)),
        **common,
    )
    assert started == [(0, 0.5), (1, 0.0)]
    for row, target in zip(rows, SPARSITIES):
        assert row["target_sparsity"] == target
        assert row["achieved_sparsity"] == pytest.approx(target, abs=0.01)
        assert 0.0 <= row["accuracy"] <= 1.0 and row["train_seconds"] > 0
        assert os.path.getsize(row["tflite_path"]) == row["tflite_bytes"]

    keras.utils.set_random_seed(0)
    # Both at the default selection.
    model = elsa_tf.embed(cnn_with_bn(), SPARSITIES, schedule=common["schedule"])
    elsa_tf.fit(
        model,
        data.train(32, seed=0),
        epochs_per_level=1,
        optimizer=common["optimizer"],
        loss=LOSS,
        levels=[0],
        recalibration_data=None,  # as the baseline was given
        shuffle=False,
        verbose=0,
    )
    x, y = data.test_arrays()
    predicted = elsa_tf.extract(model, 0).predict(x, verbose=0).argmax(axis=-1)
    assert rows[0]["accuracy"] == pytest.approx(float(np.mean(predicted == y)))
