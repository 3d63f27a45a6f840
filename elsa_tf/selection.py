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
