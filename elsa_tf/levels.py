"""Pure level math: level maps in, masks and counts out.

A *level map* holds, for every prunable weight, the index of the first level
that uses it, as one `uint8` per weight. Level 0 is the sparsest level and the
last level the densest. The value `UNUSED` marks a weight that no level uses
(yet). While level `k` is being trained, the map reads:

* `< k`: the weight belongs to a finished level and is frozen;
* `== k`: the weight is free and currently kept by level `k`'s sparsifier;
* `UNUSED`: the weight is free and currently pruned.

So the weights of level `j` are exactly those whose map value is `<= j`, and the
nesting of levels holds by construction. Nothing here knows about Keras: these
functions take and return plain tensors, and work eagerly or inside a graph.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import tensorflow as tf

# The map is one byte a weight; 255 is reserved, so at most 255 levels.
UNUSED = 255
MAX_LEVELS = 255
MAP_DTYPE = tf.uint8


def validate_sparsities(sparsities: Sequence[float]) -> tuple[float, ...]:
    """Checks a level list and returns it as a tuple of floats.

    Args:
        sparsities: target sparsity of each level, sparsest first.

    Returns:
        The sparsities as a tuple of Python floats.

    Raises:
        TypeError: if `sparsities` is not a sequence of real numbers.
        ValueError: if it is empty, too long, has a value outside [0, 1), or
            is not strictly decreasing.
    """
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Sequence):
        raise TypeError(
            "sparsities must be a list of numbers in [0, 1). "
            f"Received: sparsities={sparsities!r}"
        )
    for s in sparsities:
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise TypeError(
                "sparsities must be a list of numbers in [0, 1). "
                f"Received: sparsities={list(sparsities)!r}"
            )
    values = tuple(float(s) for s in sparsities)
    if not values:
        raise ValueError(
            "sparsities must name at least one level. Received: sparsities=[]"
        )
    if len(values) > MAX_LEVELS:
        raise ValueError(
            f"At most {MAX_LEVELS} levels fit in a one-byte level map. "
            f"Received: {len(values)} sparsities"
        )
    if any(not 0.0 <= s < 1.0 for s in values):
        raise ValueError(
            f"Every sparsity must be in [0, 1). Received: sparsities={list(values)}"
        )
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(
            "sparsities must be strictly decreasing (level 0 is the sparsest). "
            f"Received: sparsities={list(values)}"
        )
    return values


def active_mask(level_map: tf.Tensor, level) -> tf.Tensor:
    """Boolean mask of the weights used by `level`."""
    return level_map <= tf.cast(level, MAP_DTYPE)


def frozen_mask(level_map: tf.Tensor, current_level) -> tf.Tensor:
    """Boolean mask of the weights of levels finished before `current_level`."""
    return level_map < tf.cast(current_level, MAP_DTYPE)


def masked_weight(weight: tf.Tensor, level_map: tf.Tensor, level) -> tf.Tensor:
    """The weight as level `level` sees it: unused entries are zero."""
    return weight * tf.cast(active_mask(level_map, level), weight.dtype)


def keep_count(total: int, sparsity) -> tf.Tensor:
    """Number of weights out of `total` that a level of `sparsity` keeps."""
    total_f = tf.cast(total, tf.float64)
    return tf.cast(tf.round((1.0 - tf.cast(sparsity, tf.float64)) * total_f), tf.int64)


def magnitude(weight: tf.Tensor) -> tf.Tensor:
    """Gradual magnitude pruning's score: keep the largest weights."""
    return tf.abs(weight)


def count(mask: tf.Tensor) -> tf.Tensor:
    """Number of true entries of a boolean mask, as int64."""
    return tf.math.count_nonzero(mask, dtype=tf.int64)


def select_top(scores: tf.Tensor, candidates: tf.Tensor, n_keep) -> tf.Tensor:
    """Keeps the `n_keep` highest-scoring candidates, exactly.

    Ties are broken by position, so the count is exact even when many scores
    are equal (a freshly zeroed kernel, say).

    Args:
        scores: float tensor, any shape.
        candidates: boolean tensor of the same shape; only these can be kept.
        n_keep: how many to keep; clipped to [0, number of candidates].

    Returns:
        A boolean tensor of the shape of `scores`.
    """
    flat_scores = tf.reshape(tf.cast(scores, tf.float32), [-1])
    flat_candidates = tf.reshape(candidates, [-1])
    n = tf.clip_by_value(tf.cast(n_keep, tf.int64), 0, count(flat_candidates))
    ranked = tf.where(flat_candidates, flat_scores, float("-inf"))
    order = tf.argsort(ranked, direction="DESCENDING", stable=True)
    keep = tf.scatter_nd(
        tf.expand_dims(tf.cast(order[:n], tf.int64), 1),
        tf.ones([n], tf.bool),
        tf.shape(flat_scores, out_type=tf.int64),
    )
    return tf.reshape(keep & flat_candidates, tf.shape(scores))


def free_keep_count(total: int, frozen: tf.Tensor, sparsity) -> tf.Tensor:
    """How many free weights a level of `sparsity` keeps beside `frozen` ones.

    Frozen weights always count as kept and are never pruning candidates.
    """
    return tf.maximum(keep_count(total, sparsity) - tf.cast(frozen, tf.int64), 0)


def prune_map(level_map: tf.Tensor, keep: tf.Tensor, level) -> tf.Tensor:
    """Marks the free weights of `level` that `keep` does not keep as unused."""
    level = tf.cast(level, MAP_DTYPE)
    drop = tf.equal(level_map, level) & tf.logical_not(keep)
    return tf.where(drop, tf.constant(UNUSED, MAP_DTYPE), level_map)


def open_map(level_map: tf.Tensor, level) -> tf.Tensor:
    """Starts `level`: every weight no finished level uses becomes free for it."""
    return tf.where(tf.equal(level_map, UNUSED), tf.cast(level, MAP_DTYPE), level_map)


def level_counts(level_map: tf.Tensor, num_levels: int) -> tf.Tensor:
    """Number of weights used by each level, as an int64 vector of `num_levels`."""
    flat = tf.cast(tf.reshape(level_map, [-1]), tf.int32)
    first_use = tf.math.bincount(
        flat, minlength=num_levels, maxlength=num_levels, dtype=tf.int64
    )
    return tf.cumsum(first_use)
