"""Shared fixtures: models and data small enough to reason about by hand."""

import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import elsa_tf  # noqa: E402, F401  (registers the serializable classes)
from elsa_tf.experiments import zoo  # noqa: E402

# The examples are importable from the tests (they are thin mains over
# functions the tests call).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def digits_cnn(num_classes: int = 10) -> keras.Model:
    """The digits CNN of the main job (conv/BN x2, pool, Dense x2), 8x8x1."""
    return zoo.build("cnn", (8, 8, 1), num_classes)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def cnn_with_bn(num_classes: int = 3) -> keras.Model:
    """Conv -> BN -> ReLU -> pool -> Dense(bias) on 8x8x1 inputs."""
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu", name="hidden")(h)
    outputs = keras.layers.Dense(num_classes, name="logits")(h)
    return keras.Model(inputs, outputs, name="cnn")


def mlp(inputs: int = 8, hidden: int = 16, outputs: int = 3) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(hidden, activation="relu", name="hidden"),
            keras.layers.Dense(outputs, name="logits"),
        ],
        name="mlp",
    )


def image_data(n: int = 96, num_classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > 0).astype("int64") + (
        x[:, 4:].mean(axis=(1, 2, 3)) > 0
    ).astype("int64")
    return x, np.minimum(y, num_classes - 1)


def vector_data(n: int = 128, features: int = 8, num_classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = np.argmax(x[:, :num_classes], axis=1)
    return x, y


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def finish_levels(model, seed: int = 0):
    """Stands in for training: before finishing each level, gives the free
    weights new random values, so each denser level really holds more
    (nonzero) weights. Returns the model, every level finished."""
    from elsa_tf import model_ops

    rng = np.random.default_rng(seed)
    for _ in model_ops.sparsities(model):
        owner = model_ops.owner(model)
        for weight, level_map in zip(owner.prunable_weights, owner.level_maps):
            free = level_map.numpy() == owner.current_level
            value = keras.ops.convert_to_numpy(weight.value)
            value[free] = rng.normal(size=int(free.sum()))
            weight.assign(value)
        model_ops.finish_level(model)
    return model


@pytest.fixture
def cnn():
    return cnn_with_bn()


README = Path(__file__).resolve().parents[1] / "README.md"


def run_readme_block(tag: str, cwd) -> subprocess.CompletedProcess:
    """Runs the README's python block marked `<!-- readme-test: tag -->`
    verbatim, in a new process, as a user pasting it would."""
    match = re.search(
        rf"<!-- readme-test: {tag} -->\n```python\n(.*?)```",
        README.read_text(),
        re.DOTALL,
    )
    assert match, f"README has no block tagged {tag}"
    return subprocess.run(
        [sys.executable, "-W", "always::UserWarning", "-c", match.group(1)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=600,
    )
