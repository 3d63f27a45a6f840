"""Model-level level bookkeeping: find the owner, prune a level, move levels.

These functions act eagerly on an embedded model between training steps; the
math itself lives in `elsa_tf.levels`.
"""

from __future__ import annotations

import keras
import numpy as np

from elsa_tf import elsa_model, levels


def owner(model):
    """The `ElsaModel` that holds an embedded model's levels.

    Raises:
        TypeError: if `model` is not a Keras model.
        ValueError: if `model` is not embedded.
    """
    if isinstance(model, elsa_model.ElsaModel):
        return model
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model. Received: model={model!r}")
    raise ValueError(
        f"Model {model.name!r} is not embedded: it holds no elsa_tf level "
        "maps. Call `elsa_tf.embed(model, sparsities=...)` first."
    )


def sparsities(model) -> tuple[float, ...]:
    """The level sparsities of an embedded model."""
    return owner(model).sparsities


def current_level(model) -> int:
    """The level being trained; equals the number of finished levels."""
    return owner(model).current_level


def check_level(model, level, name: str = "level") -> int:
    """Validates a level index against the model's levels and returns it."""
    num = len(sparsities(model))
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < num:
        raise ValueError(
            f"{name} must be an int in [0, {num - 1}] for a model with {num} "
            f"levels. Received: {name}={level!r}"
        )
    return level


def set_view_level(model, level: int) -> None:
    """Makes the embedded model compute with the weights of `level`."""
    check_level(model, level)
    owner(model).set_view_level(level)


def set_raw_training(model, enabled: bool) -> None:
    """Lets training steps run on the raw weights, with no mask.

    Only valid while a `FreezingOptimizer` keeps every weight the current
    level does not use at zero; `LevelScheduler` turns it on for its run.
    Takes effect when the train step is next traced.
    """
    owner(model).train_raw = bool(enabled)


def _units(scores, level_map, level, block_shape):
    """One weight's selection units: their scores, sizes and candidacy.

    A unit is a single weight, or a block when `block_shape` is set; a block
    is a candidate when all its weights are free (maps are block-constant,
    so it is then wholly free or wholly not).
    """
    free = level_map == level
    if block_shape is None:
        return scores.reshape(-1), np.ones(free.size, np.int64), free.reshape(-1)
    return (
        levels.block_reduce(scores, block_shape).reshape(-1),
        levels.block_sizes(level_map.shape, block_shape).reshape(-1),
        (levels.block_reduce(free, block_shape) == 1.0).reshape(-1),
    )


def _expand(unit_keep, shape, block_shape):
    """A weight's keep mask from its units' (see `_units`)."""
    if block_shape is None:
        return unit_keep.reshape(shape)
    grid = levels.block_sizes(shape, block_shape).shape
    return levels.block_expand(unit_keep.reshape(grid), block_shape, shape)


def _select_units(scores, maps, level, sparsity, block_shapes):
    """Keep masks of weights ranked together in units (blocks or weights)."""
    n_free = levels.free_keep_count(
        sum(m.size for m in maps),
        sum(np.count_nonzero(m < level) for m in maps),
        sparsity,
    )
    units = [_units(s, m, level, b) for s, m, b in zip(scores, maps, block_shapes)]
    keep = levels.select_top_units(
        *(np.concatenate([u[i] for u in units]) for i in range(3)), n_free
    )
    counts = [u[0].size for u in units]
    return [
        _expand(k, m.shape, b)
        for k, m, b in zip(np.split(keep, np.cumsum(counts)[:-1]), maps, block_shapes)
    ]


def prune_to(model, sparsity, score=levels.magnitude) -> None:
    """Prunes the free weights of the current level down to `sparsity`.

    Only weights kept so far in the current level are candidates (pruning is
    monotone inside a level, as in gradual magnitude pruning); frozen weights
    count as kept. Pruned weights are zeroed. Under the owner's
    `block_shape`, rank-2 weights are ranked and pruned in whole blocks, by
    mean score, and the kept count is the achievable one nearest the target
    (`levels.select_top_units`).

    Args:
        model: an embedded model.
        sparsity: the sparsity to reach over the prunable weights.
        score: NumPy weight array -> score array; the highest scores are kept.
    """
    o = owner(model)
    k = o.current_level
    if k >= o.num_levels:
        raise ValueError("Every level is finished; there is nothing left to prune.")
    weights = o.prunable_weights
    values = [keras.ops.convert_to_numpy(v.value) for v in weights]
    maps = [m.numpy() for m in o.level_maps]
    block_shapes = [levels.weight_block_shape(m.shape, o.block_shape) for m in maps]
    elementwise = all(b is None for b in block_shapes)
    if o.selection == "global" and elementwise:
        flat_maps = np.concatenate([m.reshape(-1) for m in maps])
        n_free = levels.free_keep_count(
            flat_maps.size, np.count_nonzero(flat_maps < k), sparsity
        )
        keep = levels.select_top(
            np.concatenate([score(v).reshape(-1) for v in values]),
            flat_maps == k,
            n_free,
        )
        keeps = np.split(keep, np.cumsum([m.size for m in maps])[:-1])
    elif o.selection == "global":
        scores = [score(v) for v in values]
        keeps = _select_units(scores, maps, k, sparsity, block_shapes)
    else:
        keeps = [
            levels.select_top(
                score(v),
                m == k,
                levels.free_keep_count(m.size, np.count_nonzero(m < k), sparsity),
            )
            if b is None
            else _select_units([score(v)], [m], k, sparsity, [b])[0]
            for v, m, b in zip(values, maps, block_shapes)
        ]
    for weight, map_variable, value, level_map, keep in zip(
        weights, o.level_maps, values, maps, keeps
    ):
        drop = (level_map == k) & ~keep.reshape(level_map.shape)
        if not drop.any():
            continue  # early in a ramp most updates keep everything
        map_variable.assign(levels.prune_map(level_map, ~drop, k))
        value[drop] = 0
        weight.assign(value)


def finish_level(model) -> int:
    """Prunes the current level to its exact target, freezes it, opens the next.

    Returns:
        The index of the level just finished.
    """
    o = owner(model)
    k = o.current_level
    prune_to(model, o.sparsities[k])
    o.finish_level()
    return k


def level_counts(model) -> list[dict]:
    """Per prunable weight: its name, size and kept count at every level."""
    o = owner(model)
    rows = []
    for path, weight, level_map in zip(
        o.weight_owners, o.prunable_weights, o.level_maps
    ):
        values = level_map.numpy()
        rows.append(
            {
                "layer": path,
                "weight": weight.path,
                "size": int(values.size),
                "kept": levels.level_counts(values, o.num_levels).tolist(),
            }
        )
    return rows


def reset_compiled_functions(model, in_fit: bool = False) -> None:
    """Drops traced functions after a level change, which they bake in.

    Inside `fit` the train function is rebuilt at once, since the running
    loop calls `model.train_function` directly.
    """
    model.test_function = None
    model.predict_function = None
    if in_fit:
        model.make_train_function(force=True)
    else:
        model.train_function = None
