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

With a `block_shape`, a rank-2 weight is selected in whole blocks instead of
single weights (as tfmot's `block_size`): `block_reduce` scores each block by
the mean of its weights' scores, `select_top_units` keeps the best blocks,
and `block_expand` spreads the blocks' decisions back onto the weights, so a
level map stays constant on every block.
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


def validate_block_shape(block_shape) -> tuple[int, int] | None:
    """Checks a block shape and returns it as a pair of ints, or None.

    Args:
        block_shape: None (single weights) or a pair of positive ints.

    Returns:
        None, or the block shape as a tuple of two Python ints.

    Raises:
        TypeError: if `block_shape` is neither None nor a pair of ints.
        ValueError: if it has other than two entries, or one is below 1.
    """
    if block_shape is None:
        return None
    message = (
        "block_shape must be None or a pair of positive ints, e.g. (4, 1). "
        f"Received: block_shape={block_shape!r}"
    )
    if isinstance(block_shape, (str, bytes)) or not isinstance(block_shape, Sequence):
        raise TypeError(message)
    for b in block_shape:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral):
            raise TypeError(message)
    if len(block_shape) != 2 or any(b < 1 for b in block_shape):
        raise ValueError(message)
    return (int(block_shape[0]), int(block_shape[1]))


def weight_block_shape(shape, block_shape) -> tuple[int, int] | None:
    """The block shape a weight of `shape` is selected in; None: weight by weight.

    Only rank-2 weights are selected in blocks, as in tfmot; a (1, 1) block
    is a single weight, which the faster elementwise selection handles.
    """
    if block_shape is None or len(shape) != 2 or tuple(block_shape) == (1, 1):
        return None
    return tuple(block_shape)


def active_mask(level_map: tf.Tensor, level) -> tf.Tensor:
    """Boolean mask of the weights used by `level`."""
    return level_map <= tf.cast(level, MAP_DTYPE)


def frozen_mask(level_map: tf.Tensor, current_level) -> tf.Tensor:
    """Boolean mask of the weights of levels finished before `current_level`."""
    return level_map < tf.cast(current_level, MAP_DTYPE)


def frozen_mask_np(level_map: np.ndarray, current_level: int) -> np.ndarray:
    """`frozen_mask` in NumPy, for the eager selection side."""
    return np.asarray(level_map) < current_level


def masked_weight(weight: tf.Tensor, level_map: tf.Tensor, level) -> tf.Tensor:
    """The weight as level `level` sees it: unused entries are zero."""
    return tf.where(active_mask(level_map, level), weight, tf.zeros([], weight.dtype))


def project_update(old, new, level_map, level, zero_unused: bool = True):
    """An optimizer update of a prunable weight, put back onto the level.

    Frozen entries (levels before `level`) keep `old`. Entries of `level`
    take `new`; so do entries no level uses so far (free and pruned) when
    `zero_unused` is False (a sparsifier with feedback trains them), and
    otherwise they stay zero. `level` may be a tensor (a traced step that
    serves every level reads it from a variable); `old` may be None when
    no level is finished yet, as nothing is frozen then.
    """
    current = tf.cast(level, MAP_DTYPE)
    if zero_unused:
        # A scalar zero broadcasts: no zero tensor is allocated every step.
        value = tf.where(tf.equal(level_map, current), new, tf.zeros([], new.dtype))
    else:
        value = new
    if old is not None:
        value = tf.where(level_map < current, old, value)
    return value


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


def _grid(shape, block_shape):
    """Blocks along each axis, counting partial edge blocks."""
    return tuple(-(-n // b) for n, b in zip(shape, block_shape))


def block_sizes(shape, block_shape) -> np.ndarray:
    """Number of weights in each block of a rank-2 `shape`, as int64.

    Blocks tile the weight from index (0, 0); where `block_shape` does not
    divide `shape`, the last row or column of blocks is smaller.
    """
    sides = [np.minimum(b, n - np.arange(0, n, b)) for n, b in zip(shape, block_shape)]
    return np.outer(*sides).astype(np.int64).reshape(_grid(shape, block_shape))


def block_reduce(array: np.ndarray, block_shape) -> np.ndarray:
    """Mean of a rank-2 `array` over each block, as float64.

    A partial edge block averages the weights it holds (like average pooling
    with "SAME" padding, which tfmot uses), not padding.

    Example:

    >>> block_reduce(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), (2, 1))
    array([[2., 3.],
           [5., 6.]])
    """
    array = np.asarray(array, np.float64)
    (rows, cols), (br, bc) = array.shape, block_shape
    grid = _grid(array.shape, block_shape)
    padded = np.zeros((grid[0] * br, grid[1] * bc))
    padded[:rows, :cols] = array
    sums = padded.reshape(grid[0], br, grid[1], bc).sum(axis=(1, 3))
    return sums / block_sizes(array.shape, block_shape)


def block_expand(block_array: np.ndarray, block_shape, shape) -> np.ndarray:
    """Spreads one value per block back onto a weight of `shape`.

    The inverse of `block_reduce` for arrays constant on every block.
    """
    block_array = np.asarray(block_array)
    expected = _grid(shape, block_shape)
    if block_array.shape != expected:
        raise ValueError(
            f"A weight of shape {tuple(shape)} in blocks of {tuple(block_shape)} "
            f"has {expected} blocks. Received: block_array of shape "
            f"{block_array.shape}"
        )
    full = np.repeat(np.repeat(block_array, block_shape[0], 0), block_shape[1], 1)
    return full[: shape[0], : shape[1]]


def select_top_units(
    scores: np.ndarray, sizes: np.ndarray, candidates: np.ndarray, n_keep: int
) -> np.ndarray:
    """Keeps the highest-scoring units until they hold about `n_keep` weights.

    A unit is a block of weights (or a single weight, of size 1). Candidates
    are taken in decreasing order of score, ties by position, and the cut is
    placed where the kept weight count is nearest `n_keep`; when two counts
    are equally near, the smaller wins, so a level is never denser than its
    target for nothing. The count is thus off by at most half the size of the
    unit at the cut, and exact with units of size 1.

    Args:
        scores: float array, one score per unit, any shape.
        sizes: positive int array of the same shape: weights in each unit.
        candidates: boolean array of the same shape; only these can be kept.
        n_keep: how many weights to keep; clipped to [0, weights in the
            candidates].

    Returns:
        A boolean array of the shape of `scores`, True for kept units.

    Example:

    >>> select_top_units(
    ...     np.array([0.9, 0.5, 0.7]), np.array([4, 4, 2]), np.ones(3, bool), 6
    ... )
    array([ True, False,  True])
    """
    flat_scores = np.asarray(scores, np.float64).reshape(-1)
    flat_sizes = np.asarray(sizes, np.int64).reshape(-1)
    index = np.flatnonzero(np.asarray(candidates).reshape(-1))
    # A stable sort on the negated scores keeps tied units in position order.
    order = index[np.argsort(-flat_scores[index], kind="stable")]
    kept = np.concatenate([[0], np.cumsum(flat_sizes[order])])
    n = min(max(int(n_keep), 0), int(kept[-1]))
    cut = int(np.searchsorted(kept, n))  # the first count at or above n
    if cut > 0 and n - kept[cut - 1] <= kept[cut] - n:
        cut -= 1
    keep = np.zeros(flat_scores.shape, bool)
    keep[order[:cut]] = True
    return keep.reshape(np.shape(scores))


def set_kept(level_map: np.ndarray, keep: np.ndarray, level: int) -> np.ndarray:
    """The map after a mask update of `level`: free weights in `keep` are
    kept by it, the other free weights are pruned (`UNUSED`)."""
    level_map = np.asarray(level_map)
    free = level_map >= level
    updated = np.where(np.asarray(keep, bool), np.uint8(level), np.uint8(UNUSED))
    return np.where(free, updated, level_map).astype(np.uint8)


def reactivated_count(level_map: np.ndarray, keep: np.ndarray, level: int) -> int:
    """Free weights pruned earlier in the level that `keep` brings back."""
    del level  # every pruned free weight is UNUSED, whatever the level
    return int(np.count_nonzero((np.asarray(level_map) == UNUSED) & keep))


def open_map(level_map: np.ndarray, level: int) -> np.ndarray:
    """Starts `level`: every weight no finished level uses becomes free for it."""
    return np.where(level_map == UNUSED, np.uint8(level), level_map).astype(np.uint8)


def unused_units(kept: np.ndarray) -> np.ndarray:
    """Where a kernel's units (its last axis) keep no weight, as a mask of
    the kernel's shape: True on every entry of such a unit."""
    kept = np.asarray(kept, bool)
    unused = ~kept.reshape(-1, kept.shape[-1]).any(axis=0)
    return np.broadcast_to(unused, kept.shape)


def level_counts(level_map: np.ndarray, num_levels: int) -> np.ndarray:
    """Number of weights used by each level, as an int64 array of `num_levels`."""
    first_use = np.bincount(np.asarray(level_map).reshape(-1), minlength=256)
    return np.cumsum(first_use[:num_levels]).astype(np.int64)
