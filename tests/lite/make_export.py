"""Builds the exports the on-device tests read (needs TensorFlow).

Trains the zoo's digits CNN on scikit-learn's digits for three levels, exports it in
every quantization mode, and saves the inputs and the outputs of
`extract(model, level)` beside them, so tests without TensorFlow can compare.
The same CNN embedded at channel granularity (three physically narrower
levels, one epoch each) is exported to `CHANNEL/`, with a channel bundle.

    python tests/lite/make_export.py OUT_DIR
"""

from __future__ import annotations

import os
import sys

import numpy as np

SPARSITIES = (0.9, 0.5, 0.0)
MODES = ("float32", "float16", "dynamic", "int8")
REFERENCE = "reference.npz"
CHANNEL = "channel"
CHANNEL_SPARSITIES = (0.75, 0.5, 0.0)


def make(out_dir, epochs_per_level: int = 3) -> str:
    """Writes `out_dir/<mode>/` exports and `out_dir/reference.npz`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    import elsa_tf
    from elsa_tf.experiments import datasets, zoo

    keras.utils.set_random_seed(0)
    x_train, y_train, x_test, y_test = datasets.digits_split(0)
    model = elsa_tf.embed(
        zoo.build("cnn", (8, 8, 1), 10), SPARSITIES, selection="global"
    )
    elsa_tf.fit(
        model,
        x_train,
        y_train,
        epochs_per_level=epochs_per_level,
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        batch_size=64,
        verbose=0,
    )
    x, y = x_test[:200], y_test[:200]
    for mode in MODES:
        elsa_tf.export_tflite(
            model,
            os.path.join(out_dir, mode),
            quantization=None if mode == "float32" else mode,
            representative_data=x_train,
            evaluation_data=(x, y),
            overwrite=True,
            sparse_encoding=True,
        )
    outputs = {
        f"level{k}": keras.ops.convert_to_numpy(elsa_tf.extract(model, k)(x))
        for k in range(len(SPARSITIES))
    }
    channel = elsa_tf.embed(
        zoo.build("cnn", (8, 8, 1), 10),
        CHANNEL_SPARSITIES,
        granularity="channel",
        selection="per_layer",
    )
    elsa_tf.fit(
        channel,
        x_train,
        y_train,
        epochs_per_level=1,
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        batch_size=64,
        verbose=0,
    )
    elsa_tf.export_tflite(
        channel,
        os.path.join(out_dir, CHANNEL),
        evaluation_data=(x, y),
        overwrite=True,
    )
    outputs.update(
        {
            f"{CHANNEL}{k}": keras.ops.convert_to_numpy(elsa_tf.extract(channel, k)(x))
            for k in range(len(CHANNEL_SPARSITIES))
        }
    )
    np.savez(os.path.join(out_dir, REFERENCE), x=x, y=y, **outputs)
    return os.fspath(out_dir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(make(sys.argv[1]))
