"""Freezing is exact: a finished level's predictions never change again."""

import keras
import numpy as np
import pytest
from conftest import LOSS, cnn_with_bn, image_data

import elsa_tf

OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adamw": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.5),
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "rmsprop": lambda: keras.optimizers.RMSprop(1e-2),
}


@pytest.mark.parametrize("shared", ["freeze", "per_level"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_finished_level_predictions_never_change(optimizer, shared):
    x, y = image_data()
    model = elsa_tf.embed(cnn_with_bn(), [0.8, 0.5, 0.0], shared=shared)
    snapshots = []
    for level in range(3):
        elsa_tf.fit(
            model,
            x,
            y,
            levels=[level],
            epochs_per_level=2,
            optimizer=OPTIMIZERS[optimizer](),
            loss=LOSS,
            batch_size=32,
            verbose=0,
        )
        snapshots.append(elsa_tf.extract(model, level).predict(x, verbose=0))
    for level, before in enumerate(snapshots):
        after = elsa_tf.extract(model, level).predict(x, verbose=0)
        np.testing.assert_allclose(after, before, atol=1e-6, rtol=0)
    # Training really happened: the levels differ from each other.
    assert np.abs(snapshots[0] - snapshots[2]).max() > 1e-3


def test_plain_optimizer_would_break_freezing_so_scheduler_refuses_it():
    x, y = image_data()
    model = elsa_tf.embed(cnn_with_bn(), [0.5, 0.0])
    model.compile(optimizer=keras.optimizers.Adam(), loss=LOSS)
    with pytest.raises(TypeError, match="FreezingOptimizer"):
        model.fit(x, y, epochs=2, callbacks=[elsa_tf.LevelScheduler(1)], verbose=0)
