"""The sparsifier seam: built-in methods, users' own, and checks of their answers."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    LOSS,
    mlp,
    run_readme_block,
    vector_data,
)

import elsa_tf
from elsa_tf import levels, model_ops, sparsifiers
from elsa_tf import selection as selection_lib


def _digits(n=600):
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data[:n] / 16).astype("float32"), d.target[:n]


# -- resolution and bad input -------------------------------------------------


def test_names_resolve_to_the_built_in_sparsifiers():
    assert type(sparsifiers.get(None)) is elsa_tf.GradualMagnitude
    assert type(sparsifiers.get("gradual_magnitude")) is elsa_tf.GradualMagnitude
    dpf = sparsifiers.get("dpf", update_interval=4, selection="global")
    assert dpf == elsa_tf.DynamicPruningWithFeedback(4, selection="global")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sparsifiers.get("obd"), "Unknown sparsifier 'obd'"),
        (lambda: sparsifiers.get("dpf", momentum=0.9), r"\['momentum'\]"),
        (lambda: sparsifiers.get("gradual_magnitude", carry="zero"), r"\['carry'\]"),
        (
            lambda: sparsifiers.get(elsa_tf.GradualMagnitude(), selection="global"),
            "set on a sparsifier object",
        ),
        (lambda: elsa_tf.DynamicPruningWithFeedback(0), "update_interval=0"),
        (lambda: elsa_tf.DynamicPruningWithFeedback(None), "update_interval=None"),
        (lambda: elsa_tf.GradualMagnitude(update_interval=-2), "update_interval=-2"),
        (lambda: elsa_tf.DynamicPruningWithFeedback(carry="keep"), "carry='keep'"),
        (lambda: elsa_tf.Sparsifier(selection="layer"), "selection='layer'"),
    ],
)
def test_bad_sparsifier_input_names_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_embed_takes_a_sparsifier_by_name_or_object_and_refuses_both_options():
    base = mlp()
    assert isinstance(
        elsa_tf.embed(base, [0.5, 0.0], sparsifier="dpf").sparsifier,
        elsa_tf.DynamicPruningWithFeedback,
    )
    with pytest.raises(ValueError, match="set on a sparsifier object"):
        elsa_tf.embed(
            base, [0.5, 0.0], sparsifier=elsa_tf.GradualMagnitude(), selection="global"
        )
    with pytest.raises(TypeError, match="sparsifier=3"):
        elsa_tf.embed(base, [0.5, 0.0], sparsifier=3)


# -- answers are checked, not trusted ------------------------------------------


class _KeepsTooMany(elsa_tf.Sparsifier):
    def select(self, weights, level_maps, level, sparsity, step):
        return [np.ones(m.shape, bool) for m in level_maps]


class _DropsFrozen(elsa_tf.Sparsifier):
    def select(self, weights, level_maps, level, sparsity, step):
        kept = super().select(weights, level_maps, level, sparsity, step)
        kept[0] = kept[0].copy()
        kept[0][level_maps[0] < level] = False
        # Keep as many as the budget, so only the frozen rule is broken.
        free = np.flatnonzero(
            (level_maps[0] >= level).reshape(-1) & ~kept[0].reshape(-1)
        )
        n = int(np.count_nonzero(level_maps[0] < level))
        kept[0].reshape(-1)[free[:n]] = True
        return kept


def test_a_kept_set_of_the_wrong_size_is_an_error():
    model = elsa_tf.embed(mlp(), [0.5, 0.0], sparsifier=_KeepsTooMany())
    with pytest.raises(
        ValueError, match=r"_KeepsTooMany.select kept 176 weights.*keeps 88"
    ):
        model_ops.prune_to(model, 0.5)


def test_a_kept_set_that_drops_a_frozen_weight_is_an_error():
    model = elsa_tf.embed(
        mlp(), [0.5, 0.2, 0.0], sparsifier=_DropsFrozen(selection="per_layer")
    )
    model_ops.finish_level(model)  # nothing frozen yet at level 0
    with pytest.raises(ValueError, match="dropped 64 frozen weights from kept set 0"):
        model_ops.prune_to(model, 0.2)


# -- a user's own sparsifier ----------------------------------------------------


@keras.saving.register_keras_serializable(package="sparsifiers_test")
class RandomSparsifier(elsa_tf.Sparsifier):
    """Keeps random weights: a sparsifier in three lines."""

    def score(self, weight):
        return np.random.default_rng(weight.size).random(weight.shape)


@keras.saving.register_keras_serializable(package="sparsifiers_test")
class L1Sparsifier(elsa_tf.Sparsifier):
    """Magnitude selection plus an L1 loss on the weights a step uses."""

    def loss(self, weights, keeps):
        return 1e-3 * tf.add_n([tf.reduce_sum(tf.abs(w)) for w in weights])


def test_a_users_sparsifier_trains_nests_and_survives_saving(tmp_path):
    x, y = vector_data()
    model = elsa_tf.embed(mlp(), [0.75, 0.5, 0.0], sparsifier=RandomSparsifier())
    elsa_tf.fit(model, x, y, epochs_per_level=1, optimizer="adam", loss=LOSS, verbose=0)
    rows = elsa_tf.summary(model)
    assert [round(r["achieved_sparsity"], 2) for r in rows] == [0.75, 0.5, 0.0]
    # Random, not magnitude: some kept weight at level 0 is smaller than some
    # weight level 0 dropped (magnitude would never do this).
    w = model.prunable_weights[0].numpy()
    m = model.level_maps[0].numpy()
    assert np.abs(w[m == 0]).min() < np.abs(w[m == 1]).max()
    model.save(tmp_path / "random.keras")
    loaded = keras.saving.load_model(tmp_path / "random.keras")
    assert type(loaded.sparsifier) is RandomSparsifier


def test_a_sparsifier_loss_is_added_while_training_only():
    x, y = vector_data(n=32)
    model = elsa_tf.embed(mlp(), [0.5, 0.0], sparsifier=L1Sparsifier())
    model_ops.set_raw_training(model, True)
    model(x, training=True)
    assert len(model.losses) == 1 and float(model.losses[0]) > 0
    model(x, training=False)
    assert not model.losses


# -- Dynamic Pruning with Feedback ----------------------------------------------


def test_dpf_computes_with_masked_weights_and_feeds_the_gradient_back():
    model = elsa_tf.embed(mlp(), [0.5, 0.0], sparsifier="dpf")
    model_ops.prune_to(model, 0.5)
    w = model.prunable_weights[0]
    pruned = model.level_maps[0].numpy() == levels.UNUSED
    assert pruned.any() and np.all(w.numpy()[pruned] != 0)  # values kept
    x = np.random.default_rng(0).random((16, 8)).astype("float32")
    model_ops.set_raw_training(model, True)
    with tf.GradientTape() as tape:
        out_train = model(x, training=True)
        loss = tf.reduce_sum(out_train**2)
    grad = tape.gradient(loss, w.value).numpy()
    # The forward pass is the level's: what inference computes.
    np.testing.assert_allclose(out_train, model(x, training=False), atol=1e-6)
    # Straight-through: pruned weights get a gradient.
    assert np.abs(grad[pruned]).max() > 0


def test_dpf_training_reactivates_weights_and_reports_them(tmp_path):
    x, y = _digits()
    keras.utils.set_random_seed(1)
    base = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model = elsa_tf.embed(base, [0.95, 0.8, 0.0], sparsifier="dpf")
    elsa_tf.fit(
        model,
        x,
        y,
        epochs_per_level=2,
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        batch_size=16,
        verbose=0,
    )
    rows = elsa_tf.summary(model)
    assert rows[0]["reactivations"] > 0 and rows[1]["reactivations"] > 0
    assert "react." in str(rows)
    assert [round(r["achieved_sparsity"], 3) for r in rows] == [0.95, 0.8, 0.0]
    # The core's invariants: levels nest, the embedded model at a level is
    # its extracted model, and a saved model predicts the same.
    maps = [m.numpy() for m in model.level_maps]
    assert all(m.max() <= 2 for m in maps)  # every weight used by the last level
    model.save(tmp_path / "dpf.keras")
    loaded = keras.saving.load_model(tmp_path / "dpf.keras")
    for k in range(3):
        elsa_tf.set_level(model, k)
        elsa_tf.set_level(loaded, k)
        want = model.predict(x[:32], verbose=0)
        np.testing.assert_allclose(
            elsa_tf.extract(model, k).predict(x[:32], verbose=0), want, atol=1e-5
        )
        np.testing.assert_allclose(loaded.predict(x[:32], verbose=0), want, atol=1e-6)
        assert sum(int(np.count_nonzero(m <= k)) for m in maps) == rows[k]["kept"]


@pytest.mark.parametrize("carry", ["zero", "feedback"])
def test_dpf_carry_says_what_pruned_weights_start_the_next_level_from(carry):
    model = elsa_tf.embed(
        mlp(), [0.5, 0.0], sparsifier=elsa_tf.DynamicPruningWithFeedback(carry=carry)
    )
    before = model.prunable_weights[0].numpy().copy()
    model_ops.finish_level(model)
    after = model.prunable_weights[0].numpy()
    dropped = model.level_maps[0].numpy() == 1  # not kept by level 0
    if carry == "zero":
        assert np.all(after[dropped] == 0)
    else:
        np.testing.assert_array_equal(after[dropped], before[dropped])
    # Either way level 0 itself is what it kept.
    np.testing.assert_array_equal(after[~dropped], before[~dropped])


def test_dpf_updates_masks_every_interval_steps():
    x, y = vector_data(n=64)
    model = elsa_tf.embed(
        mlp(),
        [0.5, 0.0],
        sparsifier=elsa_tf.DynamicPruningWithFeedback(update_interval=3),
    )
    steps = model_ops.mask_update_steps(model, 0, 16)
    assert sorted(steps) == [0, 3, 6, 9, 12, 15]
    assert steps[15] == pytest.approx(0.5)
    del x, y


# -- custom training loops ------------------------------------------------------


def test_a_custom_loop_with_elsa_function_trains_levels_and_keeps_them_frozen():
    x, y = vector_data(n=64)
    model = elsa_tf.embed(mlp(), [0.75, 0.0])
    optimizer = elsa_tf.FreezingOptimizer(keras.optimizers.Adam(1e-2))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    traces = []

    @elsa_tf.function(model)
    def train_step(xb, yb):
        traces.append(model.traced_level)
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        variables = model.trainable_variables
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    snapshots = []
    for level in range(2):
        optimizer.reset()
        for step in range(8):
            elsa_tf.update_masks(model, step, 8)
            train_step(x[step * 8 : step * 8 + 8], y[step * 8 : step * 8 + 8])
        elsa_tf.finish_level(model)
        snapshots.append(elsa_tf.extract(model, level).predict(x, verbose=0))
    # Traced again for level 1 (tf.function traces twice when the optimizer
    # creates its variables in the first call).
    assert set(traces) == {0, 1} and traces.count(1) == 1
    np.testing.assert_allclose(
        elsa_tf.extract(model, 0).predict(x, verbose=0), snapshots[0], atol=1e-6
    )
    assert [round(r["achieved_sparsity"], 2) for r in elsa_tf.summary(model)] == [
        0.75,
        0.0,
    ]
    assert np.abs(snapshots[0] - snapshots[1]).max() > 1e-3


def test_elsa_function_refuses_a_model_that_is_not_embedded():
    with pytest.raises(ValueError, match="not embedded"):
        elsa_tf.function(mlp())


def test_summary_reports_the_share_of_zero_weights_a_level_keeps():
    model = elsa_tf.embed(mlp(), [0.5, 0.0])
    model_ops.finish_level(model)
    w = model.prunable_weights[0]
    values = w.numpy()
    values[model.level_maps[0].numpy() == 1] = 0  # level 1's new weights at zero
    w.assign(values)
    rows = elsa_tf.summary(model)
    assert rows[0]["zero_share"] == 0.0
    zeros = sum(int((v.numpy() == 0).sum()) for v in model.prunable_weights)
    assert zeros > int((values == 0).sum())  # weight 1's pruned half too
    assert rows[1]["zero_share"] == pytest.approx(zeros / rows[1]["kept"])


def test_readme_custom_sparsifier_example_runs_verbatim_in_a_new_process(tmp_path):
    result = run_readme_block("custom-sparsifier", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "RandomPruning" in result.stdout
    assert "80.00%" in result.stdout


def test_readme_custom_loop_example_runs_verbatim_in_a_new_process(tmp_path):
    result = run_readme_block("custom-loop", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "90.00%" in result.stdout and "finished" in result.stdout


def test_dpf_ends_a_level_with_the_mask_it_last_trained_with():
    model = elsa_tf.embed(mlp(), [0.5, 0.0], sparsifier="dpf")
    model_ops.prune_to(model, 0.5, step=0)
    trained_with = [m.numpy() == 0 for m in model.level_maps]
    for w, kept in zip(model.prunable_weights, trained_with):
        values = w.numpy()
        values[~kept] *= 100.0  # pruned weights grew back, after the last update
        w.assign(values)
    model_ops.finish_level(model)
    for m, kept in zip(model.level_maps, trained_with):
        np.testing.assert_array_equal(m.numpy() == 0, kept)
    # A mask update inside the level does bring them back.
    model = elsa_tf.embed(mlp(), [0.5, 0.0], sparsifier="dpf")
    model_ops.prune_to(model, 0.5, step=0)
    before = [m.numpy() == 0 for m in model.level_maps]
    for w, kept in zip(model.prunable_weights, before):
        values = w.numpy()
        values[~kept] *= 100.0
        w.assign(values)
    model_ops.prune_to(model, 0.5, step=16)
    assert model.reactivations.numpy()[0] > 0


@pytest.mark.parametrize(
    "step, level_steps, match",
    [
        (0, 0, "level_steps=0"),
        (0, 2.5, "level_steps=2.5"),
        (8, 8, "step=8"),
        (-1, 8, "step=-1"),
    ],
)
def test_update_masks_names_a_bad_step(step, level_steps, match):
    model = elsa_tf.embed(mlp(), [0.5, 0.0])
    with pytest.raises(ValueError, match=match):
        elsa_tf.update_masks(model, step, level_steps)


def test_lamp_scores_by_hand():
    scores = selection_lib.lamp_scores(
        np.array([1.0, 4.0, 3.0, 9.0]), np.array([True, True, True, False])
    )
    np.testing.assert_allclose(scores, [1 / 8, 1.0, 3 / 7, 0.0])


def test_lamp_never_empties_a_layer_that_global_ranking_empties():
    # Weight 1's magnitudes are all below weight 0's: global ranking at 75%
    # keeps none of them, LAMP keeps its best ones.
    rng = np.random.default_rng(0)
    scores = [rng.uniform(1.0, 2.0, (8, 8)), rng.uniform(0.0, 0.1, (4, 4))]
    candidates = [np.ones(s.shape, bool) for s in scores]
    frozen = [np.zeros(s.shape, bool) for s in scores]
    total = sum(s.size for s in scores)
    kept = {
        selection: selection_lib.keep_sets(
            scores, candidates, frozen, 0.75, selection=selection
        )
        for selection in ("global", "lamp")
    }
    assert not kept["global"][1].any()
    assert kept["lamp"][1].any()
    for sets in kept.values():
        assert sum(int(k.sum()) for k in sets) == round(0.25 * total)
    # Within a weight LAMP keeps the largest scores, as magnitude does.
    small = scores[1][kept["lamp"][1]].min()
    assert small >= scores[1][~kept["lamp"][1]].max()


def _lamp_by_scores(scores, candidates, frozen, sparsity):
    """LAMP as defined: `lamp_scores` of every candidate, one global ranking."""
    free = [c & ~f for c, f in zip(candidates, frozen)]
    lamp = [selection_lib.lamp_scores(np.square(s), c) for s, c in zip(scores, free)]
    n_free = levels.free_keep_count(
        sum(c.size for c in free), sum(int(f.sum()) for f in frozen), sparsity
    )
    keep = levels.select_top(
        np.concatenate([s.reshape(-1) for s in lamp]),
        np.concatenate([c.reshape(-1) for c in free]),
        n_free,
    )
    sizes = np.cumsum([s.size for s in scores])[:-1]
    return [
        k.reshape(s.shape) | f for k, s, f in zip(np.split(keep, sizes), scores, frozen)
    ]


@pytest.mark.parametrize("zeros", [0.0, 0.6])
def test_lamp_selection_equals_ranking_every_lamp_score(zeros):
    # keep_sets scores only the smaller side of the cut; the kept sets must
    # be those of ranking every candidate's LAMP score (no ties here but
    # zeros, which the count settles), on both sides of the cut.
    rng = np.random.default_rng(7)
    compared = 0
    for trial in range(60):
        shapes = [tuple(rng.integers(1, 12, size=2)) for _ in range(3)]
        scores = [
            np.where(rng.random(s) < zeros, 0.0, rng.normal(size=s)) for s in shapes
        ]
        candidates = [rng.random(s) < 0.8 for s in shapes]
        frozen = [(rng.random(s) < 0.2) & ~c for c, s in zip(candidates, shapes)]
        sparsity = float(rng.random())
        if any(not s[c & ~f].any() for s, c, f in zip(scores, candidates, frozen)):
            # A layer whose candidates are all zero scores them all 1 (its
            # best candidates), a tie with every other layer's best.
            continue
        compared += 1
        got = selection_lib.keep_sets(
            scores, candidates, frozen, sparsity, selection="lamp"
        )
        want = _lamp_by_scores(scores, candidates, frozen, sparsity)
        assert sum(int(k.sum()) for k in got) == sum(int(k.sum()) for k in want)
        for g, w, s in zip(got, want, scores):
            # The same kept nonzero weights; zeros tie, only their count counts.
            np.testing.assert_array_equal(g & (s != 0), w & (s != 0), str(trial))
    assert compared >= 30


def test_extreme_breaks_ties_by_position():
    values = np.array([2.0, 1.0, 2.0, 0.0, 1.0, 0.0, 3.0])
    # Stable ascending order: 3(0) 5(0) 1(1) 4(1) 0(2) 2(2) 6(3).
    assert sorted(selection_lib._extreme(values, 3, largest=True)) == [0, 2, 6]
    assert sorted(selection_lib._extreme(values, 2, largest=True)) == [2, 6]
    assert sorted(selection_lib._extreme(values, 3, largest=False)) == [1, 3, 5]
    assert sorted(selection_lib._extreme(values, 1, largest=False)) == [3]
    assert sorted(selection_lib._extreme(values, 6, largest=True)) == [0, 1, 2, 4, 5, 6]
