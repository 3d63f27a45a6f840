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


@pytest.mark.parametrize(
    "shared, sparsifier",
    [
        ("freeze", "gradual_magnitude"),
        ("per_level", "gradual_magnitude"),
        ("per_level_statistics", "gradual_magnitude"),
        ("per_level_statistics", "dpf"),
        # Channel granularity only: the gates are trained, frozen levels not.
        ("per_level_statistics", "polarized_gates"),
    ],
)
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_finished_level_predictions_never_change(optimizer, shared, sparsifier):
    x, y = image_data()
    options = {"granularity": "channel"} if sparsifier == "polarized_gates" else {}
    model = elsa_tf.embed(
        cnn_with_bn(), [0.8, 0.5, 0.0], shared=shared, sparsifier=sparsifier, **options
    )
    snapshots, weights = [], []
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
        weights.append([w.numpy().copy() for w in model.prunable_weights])
    for level, before in enumerate(snapshots):
        after = elsa_tf.extract(model, level).predict(x, verbose=0)
        np.testing.assert_allclose(after, before, atol=1e-6, rtol=0)
        # The level's weights are bit-identical (DPF trains pruned free ones).
        for w, m, old in zip(model.prunable_weights, model.level_maps, weights[level]):
            used = m.numpy() <= level
            np.testing.assert_array_equal(w.numpy()[used], old[used])
    # Training really happened: the levels differ from each other.
    assert np.abs(snapshots[0] - snapshots[2]).max() > 1e-3


def test_plain_optimizer_would_break_freezing_so_scheduler_refuses_it():
    x, y = image_data()
    model = elsa_tf.embed(cnn_with_bn(), [0.5, 0.0])
    model.compile(optimizer=keras.optimizers.Adam(), loss=LOSS)
    with pytest.raises(TypeError, match="FreezingOptimizer"):
        model.fit(x, y, epochs=2, callbacks=[elsa_tf.LevelScheduler(1)], verbose=0)
