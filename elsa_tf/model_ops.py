"""Model-level level bookkeeping: find wrappers, prune a level, move levels.

These functions act eagerly on an embedded model between training steps; the
math itself lives in `elsa_tf.levels`.
"""

from __future__ import annotations

from collections.abc import Iterator

import keras
import tensorflow as tf

from elsa_tf import levels
from elsa_tf.wrapper import ElsaWrapper


def iter_wrappers(model: keras.layers.Layer) -> Iterator[ElsaWrapper]:
    """Yields every `ElsaWrapper` in `model`, nested models included, once."""
    seen = set()
    stack = [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, ElsaWrapper):
            yield layer
        elif isinstance(layer, keras.Model):
            stack.extend(reversed(layer.layers))


def wrappers(model) -> list[ElsaWrapper]:
    """The wrappers of an embedded model, in layer order.

    Raises:
        TypeError: if `model` is not a Keras model.
        ValueError: if `model` holds no `ElsaWrapper` (it is not embedded).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model. Received: model={model!r}")
    found = list(iter_wrappers(model))
    if not found:
        raise ValueError(
            f"Model {model.name!r} is not embedded: it holds no elsa_tf level "
            "maps. Call `elsa_tf.embed(model, sparsities=...)` first."
        )
    return found


def sparsities(model) -> tuple[float, ...]:
    """The level sparsities of an embedded model."""
    return wrappers(model)[0].sparsities


def current_level(model) -> int:
    """The level being trained; equals the number of finished levels."""
    return int(wrappers(model)[0].current_level.numpy())


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
    """Makes every wrapped layer compute with the weights of `level`."""
    check_level(model, level)
    for w in wrappers(model):
        w.view_level.assign(level)


def _prunable(model):
    return [(w, i) for w in wrappers(model) for i in range(len(w.prunable_weights))]


def prune_to(model, sparsity, score=levels.magnitude) -> None:
    """Prunes the free weights of the current level down to `sparsity`.

    Only weights kept so far in the current level are candidates (pruning is
    monotone inside a level, as in gradual magnitude pruning); frozen weights
    count as kept. Pruned weights are zeroed.

    Args:
        model: an embedded model.
        sparsity: the sparsity to reach over the prunable weights.
        score: weight tensor -> score tensor; the highest scores are kept.
    """
    entries = _prunable(model)
    if not entries:
        return
    wrapper0 = entries[0][0]
    k = int(wrapper0.current_level.numpy())
    if k >= wrapper0.num_levels:
        raise ValueError("Every level is finished; there is nothing left to prune.")
    if wrapper0.selection == "global":
        scores = [
            tf.reshape(score(w.prunable_weights[i].value), [-1]) for w, i in entries
        ]
        maps = [tf.reshape(w.level_maps[i].value, [-1]) for w, i in entries]
        all_maps = tf.concat(maps, 0)
        total = int(all_maps.shape[0])
        n_free = levels.free_keep_count(
            total, levels.count(levels.frozen_mask(all_maps, k)), sparsity
        )
        keep = levels.select_top(tf.concat(scores, 0), tf.equal(all_maps, k), n_free)
        keeps = tf.split(keep, [int(m.shape[0]) for m in maps])
    else:
        keeps = []
        for w, i in entries:
            m = w.level_maps[i].value
            n_free = levels.free_keep_count(
                int(tf.size(m)), levels.count(levels.frozen_mask(m, k)), sparsity
            )
            keeps.append(
                levels.select_top(
                    score(w.prunable_weights[i].value), tf.equal(m, k), n_free
                )
            )
    for (w, i), keep in zip(entries, keeps):
        level_map = w.level_maps[i]
        new_map = levels.prune_map(
            level_map.value, tf.reshape(keep, level_map.shape), k
        )
        level_map.assign(new_map)
        weight = w.prunable_weights[i]
        weight.assign(levels.masked_weight(weight.value, new_map, k))


def finish_level(model) -> int:
    """Prunes the current level to its exact target, freezes it, opens the next.

    Returns:
        The index of the level just finished.
    """
    ws = wrappers(model)
    k = int(ws[0].current_level.numpy())
    prune_to(model, ws[0].sparsities[k])
    for w in ws:
        w.finish_level()
    return k


def level_counts(model) -> list[dict]:
    """Per prunable weight: its name, size and kept count at every level."""
    rows = []
    for w in wrappers(model):
        for weight, level_map in zip(w.prunable_weights, w.level_maps):
            rows.append(
                {
                    "layer": w.layer.name,
                    "weight": weight.path,
                    "size": int(tf.size(level_map.value)),
                    "kept": [
                        int(c)
                        for c in levels.level_counts(level_map.value, w.num_levels)
                    ],
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
