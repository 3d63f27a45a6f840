r"""ELSA on scikit-learn's bundled 8x8 digits: the offline main job.

Embeds a small CNN with BatchNormalization at several sparsities, trains every
level with `elsa_tf.fit`, and prints `elsa_tf.summary` with each level's test
accuracy. Needs no network: the digits ship inside scikit-learn.

    python examples/digits.py --workdir=/tmp/elsa_digits

Writes `config.json`, `summary.json` and the embedded `model.keras` into
`--workdir`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/elsa_digits", "Directory for the outputs.")
flags.DEFINE_list(
    "sparsities",
    ["0.95", "0.9", "0.75", "0.5", "0.0"],
    "Level sparsities, strictly decreasing (level 0 is the sparsest).",
)
flags.DEFINE_integer("epochs_per_level", 15, "Epochs per level.", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1)
flags.DEFINE_float("learning_rate", 3e-3, "Adam learning rate.", lower_bound=0.0)
flags.DEFINE_enum(
    "shared",
    "freeze",
    ["freeze", "per_level"],
    "How biases and normalization weights are kept across levels.",
)
flags.DEFINE_enum(
    "selection",
    "global",
    ["global", "per_layer"],
    "Magnitude ranking across all layers, or within each layer.",
)
flags.DEFINE_integer("seed", 0, "Random seed for the split and the weights.")


def load_digits(seed: int = 0, test_fraction: float = 0.25):
    """The 1,797 8x8 digits, scaled to [0, 1], as (x_train, y_train, x_test, y_test)."""
    import numpy as np
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def build_cnn(num_classes: int = 10):
    """A small CNN with BatchNormalization and biases for 8x8x1 inputs."""
    import keras

    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", name="conv1")(inputs)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(32, 3, padding="same", name="conv2")(h)
    h = keras.layers.BatchNormalization(name="bn2")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(64, activation="relu", name="fc")(h)
    outputs = keras.layers.Dense(num_classes, name="logits")(h)
    return keras.Model(inputs, outputs, name="digits_cnn")


def train_and_evaluate(
    workdir: str,
    sparsities: Sequence[float],
    epochs_per_level: int = 15,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    shared: str = "freeze",
    selection: str = "global",
    seed: int = 0,
    verbose: int = 0,
):
    """Trains every level and returns the summary rows, each with its accuracy."""
    import keras

    import elsa_tf

    config = {
        "sparsities": [float(s) for s in sparsities],
        "epochs_per_level": epochs_per_level,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "shared": shared,
        "selection": selection,
        "seed": seed,
    }
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test = load_digits(seed)
    model = elsa_tf.embed(build_cnn(), sparsities, shared=shared, selection=selection)
    elsa_tf.fit(
        model,
        x_train,
        y_train,
        epochs_per_level=epochs_per_level,
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        batch_size=batch_size,
        verbose=verbose,
    )
    rows = elsa_tf.summary(model)
    for row in rows:
        level_model = elsa_tf.extract(model, row["level"])
        predictions = level_model.predict(x_test, verbose=0).argmax(axis=1)
        row["accuracy"] = float((predictions == y_test).mean())
    model.save(os.path.join(workdir, "model.keras"))
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(list(rows), f, indent=2)
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        sparsities = [float(s) for s in FLAGS.sparsities]
    except ValueError:
        raise app.UsageError(
            f"--sparsities must be numbers. Received: {','.join(FLAGS.sparsities)}"
        ) from None
    rows = train_and_evaluate(
        FLAGS.workdir,
        sparsities,
        epochs_per_level=FLAGS.epochs_per_level,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        shared=FLAGS.shared,
        selection=FLAGS.selection,
        seed=FLAGS.seed,
    )
    print(rows)
    print(f"Outputs in {FLAGS.workdir}")


if __name__ == "__main__":
    app.run(main)
