"""Pure selection math shared by every sparsifier: scores in, kept sets out.

A sparsifier scores weights; this module turns scores into *kept sets* for
one level, under the options every sparsifier shares:

* `selection`: `"per_layer"` (each weight tensor reaches the level's
  sparsity), `"global"` (one ranking across all prunable weights) or
  `"lamp"` (one ranking of layer-adaptive scores, Lee et al., ICLR 2021:
  each squared score over the sum of the squared scores of its weight's
  candidates that rank at or above it, so every weight keeps its best
  candidate first and no layer is emptied while the budget allows one per
  layer);
* granularity: single weights, or whole blocks of a rank-2 weight
  (`block_shape`), ranked by their mean score.

A kept set is a boolean array of the weight's shape. It always holds the
frozen weights (those of finished levels, which count towards the level's
budget and are never candidates), plus the best-scoring candidates up to the
budget. Nothing here knows about Keras or TensorFlow.
"""

from __future__ import annotations

import numpy as np

from elsa_tf import levels

SELECTIONS = ("per_layer", "global", "lamp")
# What a level keeps or drops: single weights (or blocks of them), or whole
# channels of the model's channel groups (`elsa_tf.channel_levels`).
GRANULARITIES = ("weight", "channel")


def _units(scores, candidates, block_shape):
    """One weight's selection units: their scores, sizes and candidacy.

    A unit is a single weight, or a block when `block_shape` is set; a block
    is a candidate when all its weights are (maps are block-constant, so it
    is then wholly a candidate or wholly not).
    """
    if block_shape is None:
        return (
            scores.reshape(-1),
            np.ones(candidates.size, np.int64),
            candidates.reshape(-1),
        )
    return (
        levels.block_reduce(scores, block_shape).reshape(-1),
        levels.block_sizes(candidates.shape, block_shape).reshape(-1),
        (levels.block_reduce(candidates, block_shape) == 1.0).reshape(-1),
    )


def _expand(unit_keep, shape, block_shape):
    """A weight's keep mask from its units' (see `_units`)."""
    if block_shape is None:
        return unit_keep.reshape(shape)
    grid = levels.block_sizes(shape, block_shape).shape
    return levels.block_expand(unit_keep.reshape(grid), block_shape, shape)


def _select_together(scores, candidates, frozen, sparsity, block_shapes):
    """Keep masks of weights ranked together (one budget for all of them)."""
    n_free = levels.free_keep_count(
        sum(c.size for c in candidates), sum(int(f.sum()) for f in frozen), sparsity
    )
    if all(b is None for b in block_shapes):
        keep = levels.select_top(
            np.concatenate([s.reshape(-1) for s in scores]),
            np.concatenate([c.reshape(-1) for c in candidates]),
            n_free,
        )
        return [
            k.reshape(c.shape)
            for k, c in zip(
                np.split(keep, np.cumsum([c.size for c in candidates])[:-1]),
                candidates,
            )
        ]
    units = [_units(s, c, b) for s, c, b in zip(scores, candidates, block_shapes)]
    keep = levels.select_top_units(
        *(np.concatenate([u[i] for u in units]) for i in range(3)), n_free
    )
    counts = [u[0].size for u in units]
    return [
        _expand(k, c.shape, b)
        for k, c, b in zip(
            np.split(keep, np.cumsum(counts)[:-1]), candidates, block_shapes
        )
    ]


def lamp_scores(scores, candidates) -> np.ndarray:
    """Layer-adaptive scores of one weight's candidates (LAMP), 0 elsewhere.

    A candidate's score over the sum of the scores of the candidates that
    rank at or above it (ties broken by position), so the best candidate of
    every weight scores 1. With scores `|w|**2` this is LAMP's score. For
    example, scores [1, 4, 3] give [1/8, 1, 3/7].
    """
    scores = np.asarray(scores, np.float64)
    candidates = np.asarray(candidates, bool)
    flat, mask = scores.reshape(-1), candidates.reshape(-1)
    out = np.zeros(flat.shape, np.float64)
    index = np.flatnonzero(mask)
    if index.size:
        order = index[np.argsort(flat[index], kind="stable")]
        ranked = flat[order]
        above = np.cumsum(ranked[::-1])[::-1]
        out[order] = np.divide(ranked, above, out=np.ones_like(ranked), where=above > 0)
    return out.reshape(scores.shape)


def _extreme(values: np.ndarray, m: int, largest: bool) -> np.ndarray:
    """Indices of the `m` largest (or smallest) of non-negative `values`,
    where the stable ascending order breaks ties: the end of that order (or
    its start). O(n), no sort.

    Zeros are set apart first: NumPy's partition slows down twentyfold on an
    array that is mostly one value, which is what a level's fresh weights
    (zero) and their scores are.
    """
    n = values.size
    if m <= 0:
        return np.zeros(0, np.int64)
    if m >= n:
        return np.arange(n)
    if largest:
        positive = np.flatnonzero(values)
        if m > positive.size:
            zeros = np.flatnonzero(values == 0)
            return np.concatenate([positive, zeros[zeros.size - (m - positive.size) :]])
        if positive.size < n:
            return positive[_extreme(values[positive], m, largest)]
        bound = np.partition(values, n - m)[n - m]
        strict = np.flatnonzero(values > bound)
        ties = np.flatnonzero(values == bound)
        return np.concatenate([strict, ties[ties.size - (m - strict.size) :]])
    zeros = np.flatnonzero(values == 0)
    if m <= zeros.size:
        return zeros[:m]
    if zeros.size:
        positive = np.flatnonzero(values)
        return np.concatenate(
            [zeros, positive[_extreme(values[positive], m - zeros.size, largest)]]
        )
    bound = np.partition(values, m - 1)[m - 1]
    strict = np.flatnonzero(values < bound)
    ties = np.flatnonzero(values == bound)
    return np.concatenate([strict, ties[: m - strict.size]])


def _lamp_keep(scores, candidates, frozen, sparsity) -> list[np.ndarray]:
    """The kept candidates of single-weight LAMP selection, sorting only the
    side of the cut that is smaller.

    Equal to `select_top` over `lamp_scores`, up to which of exactly tied
    scores is kept; much cheaper on large layers, where a mask update sorts
    at most half of each layer's candidate values and no indices. With n of
    N candidates kept, a weight's LAMP score depends only on the weights
    ranked at or above it, so when n <= N - n only each layer's n largest
    candidates are scored; otherwise only its N - n smallest are, each over
    the layer's total minus the candidates ranked below it, and the lowest
    scores are dropped. Scores rise with magnitude within a layer, so the
    global cut only says how many candidates each layer keeps (or drops);
    they are then its largest (smallest), found without sorting.
    """
    index = [np.flatnonzero(c.reshape(-1)) for c in candidates]
    total = sum(i.size for i in index)
    n_keep = levels.free_keep_count(
        sum(c.size for c in candidates), sum(int(f.sum()) for f in frozen), sparsity
    )
    n_keep = min(max(n_keep, 0), total)
    keep_side = n_keep <= total - n_keep
    budget = n_keep if keep_side else total - n_keep
    sides, lamp = [], []
    for s, idx in zip(scores, index):
        # |score| orders as its square does; only the m values are squared.
        s = np.asarray(s).reshape(-1)
        magnitude = np.abs(s if idx.size == s.size else s[idx])
        m = min(budget, magnitude.size)
        # The side's positions in index order (a mask, not a sort), so that
        # ties among them still break by index.
        in_side = np.zeros(magnitude.size, bool)
        in_side[_extreme(magnitude, m, largest=keep_side)] = True
        side = np.flatnonzero(in_side)
        ranked = np.square(np.sort(magnitude[side]).astype(np.float64))
        if keep_side:
            above = np.cumsum(ranked[::-1])[::-1]
        else:
            total_sq = np.einsum("i,i->", magnitude, magnitude, dtype=np.float64)
            above = total_sq - np.concatenate(([0.0], np.cumsum(ranked)[:-1]))
        lamp.append(np.divide(ranked, above, out=np.ones_like(ranked), where=above > 0))
        sides.append((idx[side], magnitude[side]))
    flat = np.concatenate(lamp)
    owner = np.repeat(np.arange(len(lamp)), [a.size for a in lamp])
    # The global cut: which layers the `budget` highest (lowest) scores are in.
    picked = owner[_extreme(flat, budget, largest=keep_side)]
    counts = np.bincount(picked, minlength=len(lamp))
    kept = []
    for c, idx, (positions, values), count in zip(candidates, index, sides, counts):
        keep = np.zeros(c.size, bool)
        chosen = positions[_extreme(values, int(count), largest=keep_side)]
        if keep_side:
            keep[chosen] = True
        else:
            keep[idx] = True
            keep[chosen] = False
        kept.append(keep.reshape(c.shape))
    return kept


def keep_sets(
    scores,
    candidates,
    frozen,
    sparsity: float,
    *,
    selection: str = "per_layer",
    block_shape=None,
) -> list[np.ndarray]:
    """The kept set of every weight for a level of `sparsity`.

    Args:
        scores: one float array per weight; the highest scores are kept.
        candidates: one boolean array per weight: the free weights that may
            be kept.
        frozen: one boolean array per weight: the weights of finished
            levels, always kept and counted towards the budget.
        sparsity: the level's target sparsity.
        selection: `"per_layer"`, `"global"` or `"lamp"` (global, on each
            weight's `lamp_scores`; blocks rank by their mean).
        block_shape: None, or the block shape of rank-2 weights.

    Returns:
        One boolean array per weight: `frozen` plus the kept candidates.
    """
    if selection not in SELECTIONS:
        raise ValueError(
            f"selection must be one of {SELECTIONS}. Received: selection={selection!r}"
        )
    scores = [np.asarray(s) for s in scores]
    candidates = [
        np.asarray(c, bool) & ~np.asarray(f, bool) for c, f in zip(candidates, frozen)
    ]
    frozen = [np.asarray(f, bool) for f in frozen]
    block_shapes = [levels.weight_block_shape(c.shape, block_shape) for c in candidates]
    if selection == "lamp":
        if all(b is None for b in block_shapes):
            kept = _lamp_keep(scores, candidates, frozen, sparsity)
            return [k | f for k, f in zip(kept, frozen)]
        scores = [lamp_scores(np.square(s), c) for s, c in zip(scores, candidates)]
    if selection != "per_layer":
        kept = _select_together(scores, candidates, frozen, sparsity, block_shapes)
    else:
        kept = [
            _select_together([s], [c], [f], sparsity, [b])[0]
            for s, c, f, b in zip(scores, candidates, frozen, block_shapes)
        ]
    return [k | f for k, f in zip(kept, frozen)]


def expected_kept(
    sizes, frozen_counts, candidate_counts, sparsity, *, selection="per_layer"
) -> int:
    """How many weights a level's kept sets hold in all, elementwise.

    The budget `levels.keep_count`, never fewer than the frozen weights nor
    more than the frozen weights and the candidates.
    """
    if selection != "per_layer":
        frozen, candidates = sum(frozen_counts), sum(candidate_counts)
        budget = levels.keep_count(sum(sizes), sparsity)
        return min(max(budget, frozen), frozen + candidates)
    return sum(
        min(max(levels.keep_count(n, sparsity), f), f + c)
        for n, f, c in zip(sizes, frozen_counts, candidate_counts)
    )


def count_tolerance(shapes, block_shape, *, selection="per_layer") -> int:
    """How far a block-granular kept count may fall from `expected_kept`.

    Each ranking cuts at the achievable count nearest its target, off by at
    most half a block (`levels.select_top_units`); elementwise selection is
    exact.
    """
    halves = []
    for shape in shapes:
        b = levels.weight_block_shape(shape, block_shape)
        halves.append(0 if b is None else (b[0] * b[1]) // 2)
    if selection != "per_layer":
        return max(halves, default=0)
    return sum(halves)


def checked_sets(kept, codes, level: int, answer: str, unit: str) -> list[np.ndarray]:
    """A sparsifier's kept sets as bool arrays, checked against level codes.

    Args:
        kept: the sparsifier's answer, one array per entry of `codes`.
        codes: level codes (a weight's level map, or a channel group's codes).
        level: the level being trained.
        answer: what gave the answer, for messages (`"GradualMagnitude.select"`).
        unit: what the codes index, for messages (`"weight"`, `"channel"`).

    Raises:
        ValueError: for the wrong number of sets, a set of the wrong shape, or
            one that drops an element of a finished level.
    """
    kept = list(kept)
    if len(kept) != len(codes):
        raise ValueError(
            f"{answer} returned {len(kept)} kept sets for {len(codes)} entries "
            f"({unit} codes)."
        )
    out = []
    for i, (k, c) in enumerate(zip(kept, codes)):
        k = np.asarray(k)
        if k.shape != c.shape:
            raise ValueError(
                f"{answer} returned kept set {i} of shape {k.shape} for "
                f"{unit} codes of shape {c.shape}."
            )
        k = k.astype(bool)
        dropped = int((levels.frozen_mask_np(c, level) & ~k).sum())
        if dropped:
            raise ValueError(
                f"{answer} dropped {dropped} frozen {unit}s from kept set {i}: "
                f"the {unit}s of finished levels are always kept."
            )
        out.append(k)
    return out
