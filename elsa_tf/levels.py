"""Pure level math: level maps in, masks and counts out.

A *level map* holds, for every prunable weight, the index of the first level
that uses it, as one `uint8` per weight. Level 0 is the sparsest level and the
last level the densest. The value `UNUSED` marks a weight that no level uses
(yet). While level `k` is being trained, the map reads:

* `< k`: the weight belongs to a finished level and is frozen;
* `== k`: the weight is free and currently kept by level `k`'s sparsifier;
* `UNUSED`: the weight is free and currently pruned.

So the weights of level `j` are exactly those whose map value is `<= j`, and the
nesting of levels holds by construction. Nothing here knows about Keras.

Two kinds of functions: the forward ones (`active_mask`, `frozen_mask`,
`masked_weight`) are TensorFlow ops, traced into every training step; the
selection ones, run eagerly between steps when masks change, are NumPy, whose
O(n) `argpartition` is about 20 times faster than sorting with TensorFlow.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
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
    return tf.where(active_mask(level_map, level), weight, tf.zeros([], weight.dtype))


def project_update(old, new, level_map, level: int):
    """An optimizer update of a prunable weight, put back onto the level.

    Frozen entries (levels before `level`) keep `old`, entries of `level`
    take `new`, and entries no level uses so far stay zero.
    """
    current = tf.cast(level, MAP_DTYPE)
    # A scalar zero broadcasts: no zero tensor is allocated every step.
    value = tf.where(tf.equal(level_map, current), new, tf.zeros([], new.dtype))
    if level > 0:
        value = tf.where(level_map < current, old, value)
    return value


def magnitude(weight: np.ndarray) -> np.ndarray:
    """Gradual magnitude pruning's score: keep the largest weights."""
    return np.abs(weight)


def keep_count(total: int, sparsity: float) -> int:
    """Number of weights out of `total` that a level of `sparsity` keeps."""
    return int(round((1.0 - float(sparsity)) * total))


def free_keep_count(total: int, frozen: int, sparsity: float) -> int:
    """How many free weights a level of `sparsity` keeps beside `frozen` ones.

    Frozen weights always count as kept and are never pruning candidates.
    """
    return max(keep_count(total, sparsity) - int(frozen), 0)


def select_top(scores: np.ndarray, candidates: np.ndarray, n_keep: int) -> np.ndarray:
    """Keeps exactly the `n_keep` highest-scoring candidates.

    The count is exact even when scores tie (a freshly zeroed kernel, say).

    Args:
        scores: float array, any shape.
        candidates: boolean array of the same shape; only these can be kept.
        n_keep: how many to keep; clipped to [0, number of candidates].

    Returns:
        A boolean array of the shape of `scores`.
    """
    flat_candidates = np.asarray(candidates).reshape(-1)
    index = np.flatnonzero(flat_candidates)
    n = int(min(max(n_keep, 0), index.size))
    keep = np.zeros(flat_candidates.shape, bool)
    if n == index.size:
        keep[index] = True
    elif n:
        ranked = np.asarray(scores).reshape(-1)[index]
        keep[index[np.argpartition(ranked, index.size - n)[index.size - n :]]] = True
    return keep.reshape(np.shape(scores))


def prune_map(level_map: np.ndarray, keep: np.ndarray, level: int) -> np.ndarray:
    """Marks the free weights of `level` that `keep` does not keep as unused."""
    drop = (level_map == level) & ~keep
    return np.where(drop, np.uint8(UNUSED), level_map).astype(np.uint8)


def open_map(level_map: np.ndarray, level: int) -> np.ndarray:
    """Starts `level`: every weight no finished level uses becomes free for it."""
    return np.where(level_map == UNUSED, np.uint8(level), level_map).astype(np.uint8)


def level_counts(level_map: np.ndarray, num_levels: int) -> np.ndarray:
    """Number of weights used by each level, as an int64 array of `num_levels`."""
    first_use = np.bincount(np.asarray(level_map).reshape(-1), minlength=256)
    return np.cumsum(first_use[:num_levels]).astype(np.int64)
