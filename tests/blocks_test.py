"""block_shape: rank-2 weights are kept or dropped in whole blocks."""

import keras
import numpy as np
import pytest
from conftest import LOSS, cnn_with_bn, mlp, vector_data
from layers_test import MODELS

import elsa_tf
from elsa_tf import levels, model_ops

BLOCK = (4, 1)
SPARSITIES = [0.9, 0.6, 0.25, 0.0]
# select_top_units cuts at the achievable count nearest the target.
HALF_BLOCK = BLOCK[0] * BLOCK[1] // 2


def _is_block_constant(level_map, block_shape=BLOCK):
    corners = level_map[:: block_shape[0], :: block_shape[1]]
    expanded = levels.block_expand(corners, block_shape, level_map.shape)
    return np.array_equal(expanded, level_map)


def _entries(model):
    """(owner, weight, level map) of every prunable weight."""
    owner = model_ops.owner(model)
    return [
        (owner, weight, level_map)
        for weight, level_map in zip(owner.prunable_weights, owner.level_maps)
    ]


def _train_free_weights(model, rng):
    """Stands in for training: new values for the current level's free weights."""
    for w, weight, level_map in _entries(model):
        free = level_map.numpy() == w.current_level
        value = keras.ops.convert_to_numpy(weight.value)
        value[free] = rng.normal(size=int(free.sum()))
        weight.assign(value)


def _check_levels(model, finished):
    """Block-constant maps, and finished levels' kept counts near their targets."""
    for _, weight, level_map in _entries(model):
        m = level_map.numpy()
        if len(m.shape) == 2:
            assert _is_block_constant(m), weight.path
        for j in range(finished):
            kept = int(np.count_nonzero(m <= j))
            target = levels.keep_count(m.size, SPARSITIES[j])
            slack = HALF_BLOCK if len(m.shape) == 2 else 0
            assert abs(kept - target) <= slack, (weight.path, j, kept, target)


@pytest.mark.parametrize("inputs", [8, 6])  # 6: partial 2x1 blocks at the edge
def test_per_layer_maps_stay_block_constant_nested_and_on_target(inputs):
    model = elsa_tf.embed(
        mlp(inputs=inputs), SPARSITIES, selection="per_layer", block_shape=BLOCK
    )
    rng = np.random.default_rng(0)
    for k, target in enumerate(SPARSITIES):
        before = [m.numpy() for _, _, m in _entries(model)]
        for sparsity in (target / 2, target):  # a gradual ramp inside the level
            _train_free_weights(model, rng)
            model_ops.prune_to(model, sparsity)
            _check_levels(model, finished=k)
            for (_, weight, level_map), old in zip(_entries(model), before):
                m = level_map.numpy()
                kept = int(np.count_nonzero(m <= k))
                assert abs(kept - levels.keep_count(m.size, sparsity)) <= HALF_BLOCK
                # Finished levels' blocks never move; pruned weights are zero.
                np.testing.assert_array_equal(m[old < k], old[old < k])
                assert not np.any(weight.numpy()[m == levels.UNUSED])
        model_ops.finish_level(model)
        _check_levels(model, finished=k + 1)


def test_blocks_are_ranked_by_mean_magnitude_along_the_inputs():
    base = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, name="d")])
    kernel = np.zeros((8, 2), "float32")
    kernel[:, 0] = [3, 0, 0, 0, -1, 1, -1, 1]  # block means 0.75 and 1.0
    kernel[:, 1] = [0.5] * 4 + [0.1] * 4  # block means 0.5 and 0.1
    base.layers[0].kernel.assign(kernel)
    model = elsa_tf.embed(base, [0.5, 0.0], block_shape=BLOCK)
    model_ops.prune_to(model, 0.5)
    (_, _, level_map), *_ = _entries(model)
    # Weight by weight, 3 and the 0.5s would have been kept.
    np.testing.assert_array_equal(
        level_map.numpy(), np.array([[0, levels.UNUSED]] * 8, np.uint8)
    )


def _unit_view(array):
    """One entry per selection unit: block means of rank-2 weights, else as is."""
    if array.ndim != 2:
        return array
    if array.dtype == np.uint8:  # a block-constant map: one corner per block
        return array[:: BLOCK[0], :: BLOCK[1]]
    return levels.block_reduce(array, BLOCK)


def test_global_selection_ranks_dense_blocks_with_conv_weights():
    model = elsa_tf.embed(
        cnn_with_bn(), [0.8, 0.5, 0.0], selection="global", block_shape=BLOCK
    )
    entries = _entries(model)
    assert [len(m.shape) for _, _, m in entries] == [4, 2, 2]  # conv, 2 Dense
    rng = np.random.default_rng(0)
    for k, target in enumerate([0.8, 0.5]):
        _train_free_weights(model, rng)
        scores = [_unit_view(np.abs(weight.numpy())) for _, weight, _ in entries]
        before = [_unit_view(m.numpy()) for _, _, m in entries]
        model_ops.prune_to(model, target)
        kept, dropped, count, total = [], [], 0, 0
        for (_, _, level_map), score, old in zip(entries, scores, before):
            m = level_map.numpy()
            count += int(np.count_nonzero(m <= k))
            total += m.size
            if m.ndim == 2:
                assert _is_block_constant(m)
            m = _unit_view(m)
            kept.append(score[(old == k) & (m == k)])
            dropped.append(score[(old == k) & (m == levels.UNUSED)])
        assert abs(count - levels.keep_count(total, target)) <= HALF_BLOCK
        # Every weight keeps some units and loses some: one ranking for all.
        assert all(d.size for d in dropped) and all(u.size for u in kept)
        assert np.concatenate(kept).min() >= np.concatenate(dropped).max()
        model_ops.finish_level(model)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_layer_type_blocks_rank_2_weights_only(name):
    build, _ = MODELS[name]
    model = elsa_tf.embed(build(), SPARSITIES, selection="per_layer", block_shape=BLOCK)
    rng = np.random.default_rng(0)
    for k in range(len(SPARSITIES)):
        _train_free_weights(model, rng)
        model_ops.finish_level(model)
        _check_levels(model, finished=k + 1)


@pytest.mark.parametrize(
    "bad, error",
    [
        ((0, 1), ValueError),
        ((4,), ValueError),
        ((4, 1, 1), ValueError),
        ("4x1", TypeError),
        (4, TypeError),
        ((4.0, 1.0), TypeError),
    ],
)
def test_bad_block_shape(bad, error):
    message = "pair of positive ints.*Received: block_shape="
    with pytest.raises(error, match=message):
        elsa_tf.embed(mlp(), [0.5, 0.0], block_shape=bad)
    with pytest.raises(error, match=message):
        elsa_tf.ElsaModel(mlp(), [0.5, 0.0], block_shape=bad)


def test_block_shape_survives_save_and_load(tmp_path):
    model = elsa_tf.embed(mlp(), [0.75, 0.5, 0.0], block_shape=[4, 1])
    model_ops.finish_level(model)
    model.save(tmp_path / "blocks.keras")
    loaded = keras.saving.load_model(tmp_path / "blocks.keras")
    owner = model_ops.owner(loaded)
    assert owner.block_shape == (4, 1)
    assert owner.get_config()["sparsifier"]["config"]["block_shape"] == [4, 1]
    # The reloaded model goes on pruning in blocks, exactly as the original.
    for m in (model, loaded):
        _train_free_weights(m, np.random.default_rng(1))
        model_ops.finish_level(m)
    for (_, _, a), (_, _, b) in zip(_entries(model), _entries(loaded)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert _is_block_constant(b.numpy())


def test_fit_keeps_maps_block_constant():
    x, y = vector_data()
    sparsities = [0.75, 0.5, 0.0]
    model = elsa_tf.embed(mlp(), sparsities, selection="per_layer", block_shape=BLOCK)
    kwargs = dict(
        epochs_per_level=2,
        optimizer=keras.optimizers.Adam(0.01),
        loss=LOSS,
        batch_size=16,
        verbose=0,
    )
    elsa_tf.fit(model, x, y, levels=[0], **kwargs)
    level0 = elsa_tf.extract(model, 0).predict(x, verbose=0)
    elsa_tf.fit(model, x, y, **kwargs)
    for _, weight, level_map in _entries(model):
        m = level_map.numpy()
        assert _is_block_constant(m), weight.path
        for k, target in enumerate(sparsities):
            kept = int(np.count_nonzero(m <= k))
            assert abs(kept - levels.keep_count(m.size, target)) <= HALF_BLOCK
    np.testing.assert_array_equal(
        elsa_tf.extract(model, 0).predict(x, verbose=0), level0
    )
    for k in range(len(sparsities)):
        elsa_tf.set_level(model, k)
        np.testing.assert_array_equal(
            elsa_tf.extract(model, k).predict(x, verbose=0),
            model.predict(x, verbose=0),
        )
