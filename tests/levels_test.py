"""The pure level math, on fixtures small enough to check by hand."""

import re

import numpy as np
import pytest
import tensorflow as tf

from elsa_tf import levels

U = levels.UNUSED


def _map(values):
    return np.array(values, np.uint8)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        ([], ValueError, "at least one level"),
        ([0.5, 0.9], ValueError, r"strictly decreasing.*\[0.5, 0.9\]"),
        ([0.5, 0.5], ValueError, "strictly decreasing"),
        ([1.0, 0.5], ValueError, r"\[0, 1\).*1.0"),
        ([0.5, -0.1], ValueError, r"\[0, 1\)"),
        (["0.5"], TypeError, "numbers"),
        ([True, 0.0], TypeError, "numbers"),
        (0.5, TypeError, "sparsities=0.5"),
        ("0.5", TypeError, "list of numbers"),
        ([0.9 - i / 1000 for i in range(256)], ValueError, "255 levels"),
    ],
)
def test_validate_sparsities_rejects(bad, error, message):
    with pytest.raises(error, match=message):
        levels.validate_sparsities(bad)


def test_validate_sparsities_accepts_numpy_numbers():
    assert levels.validate_sparsities([np.float32(0.5), 0]) == (0.5, 0.0)


def test_masks_follow_the_map():
    m = tf.constant([[0, 1], [2, U]], tf.uint8)
    np.testing.assert_array_equal(levels.active_mask(m, 0), [[1, 0], [0, 0]])
    np.testing.assert_array_equal(levels.active_mask(m, 1), [[1, 1], [0, 0]])
    np.testing.assert_array_equal(levels.active_mask(m, 2), [[1, 1], [1, 0]])
    np.testing.assert_array_equal(levels.frozen_mask(m, 2), [[1, 1], [0, 0]])
    w = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(levels.masked_weight(w, m, 1), [[1, 2], [0, 0]])


def test_select_top_is_exact_with_ties():
    scores = np.zeros([6])
    candidates = np.array([True, True, False, True, True, True])
    keep = levels.select_top(scores, candidates, 3)
    assert keep.sum() == 3 and not keep[2]


def test_select_top_prefers_large_scores_and_clips():
    scores = np.array([0.1, 0.9, 0.5, 0.7])
    candidates = np.array([True, True, True, False])
    np.testing.assert_array_equal(
        levels.select_top(scores, candidates, 2), [0, 1, 1, 0]
    )
    np.testing.assert_array_equal(
        levels.select_top(scores, candidates, 9), [1, 1, 1, 0]
    )
    np.testing.assert_array_equal(
        levels.select_top(scores, candidates, -1), [0, 0, 0, 0]
    )


def test_keep_counts_count_frozen_as_kept():
    assert int(levels.keep_count(10, 0.75)) == 2  # round(2.5) rounds to even
    assert int(levels.keep_count(10, 0.0)) == 10
    assert int(levels.free_keep_count(10, 3, 0.5)) == 2
    assert int(levels.free_keep_count(10, 7, 0.5)) == 0


def test_prune_then_open_moves_pruned_weights_to_the_next_level():
    m = _map([0, 1, 1, 1])  # level 1 in progress, one weight frozen at level 0
    keep = np.array([False, True, False, True])
    pruned = levels.set_kept(m, keep, 1)
    np.testing.assert_array_equal(pruned, [0, 1, U, 1])  # frozen weight untouched
    np.testing.assert_array_equal(levels.open_map(pruned, 2), [0, 1, 2, 1])


def test_set_kept_brings_back_pruned_free_weights_and_counts_them():
    m = _map([0, 1, U, U])  # level 1: weight 2 and 3 were pruned this level
    keep = np.array([True, False, True, False])
    np.testing.assert_array_equal(levels.set_kept(m, keep, 1), [0, U, 1, U])
    assert levels.reactivated_count(m, keep, 1) == 1


def test_level_counts_are_cumulative():
    m = _map([0, 1, 1, 2, U, U])
    np.testing.assert_array_equal(levels.level_counts(m, 3), [1, 3, 4])


def test_project_update_keeps_frozen_takes_current_zeroes_the_rest():
    m = tf.constant([0, 1, 1, U], tf.uint8)
    old = tf.constant([1.0, 2.0, 3.0, 4.0])
    new = tf.constant([9.0, 8.0, 7.0, 6.0])
    np.testing.assert_array_equal(levels.project_update(old, new, m, 1), [1, 8, 7, 0])
    np.testing.assert_array_equal(levels.project_update(None, new, m, 0), [9, 0, 0, 0])


def test_project_update_with_feedback_trains_pruned_free_weights():
    m = tf.constant([0, 1, 1, U], tf.uint8)
    old = tf.constant([1.0, 2.0, 3.0, 4.0])
    new = tf.constant([9.0, 8.0, 7.0, 6.0])
    got = levels.project_update(old, new, m, 1, zero_unused=False)
    np.testing.assert_array_equal(got, [1, 8, 7, 6])


@pytest.mark.parametrize(
    "good, expected",
    [(None, None), ((4, 1), (4, 1)), ([2, 3], (2, 3)), ((np.int64(1), 8), (1, 8))],
)
def test_validate_block_shape_accepts(good, expected):
    assert levels.validate_block_shape(good) == expected


@pytest.mark.parametrize(
    "bad, error",
    [
        ((0, 1), ValueError),
        ((4, -1), ValueError),
        ((4,), ValueError),
        ((4, 1, 1), ValueError),
        ((4.0, 1), TypeError),
        ((True, 1), TypeError),
        (4, TypeError),
        ("41", TypeError),
    ],
)
def test_validate_block_shape_rejects(bad, error):
    message = r"pair of positive ints.*Received: block_shape=" + re.escape(repr(bad))
    with pytest.raises(error, match=message):
        levels.validate_block_shape(bad)


def test_only_rank_2_weights_are_selected_in_blocks():
    assert levels.weight_block_shape((8, 3), (4, 1)) == (4, 1)
    assert levels.weight_block_shape((3, 3, 1, 4), (4, 1)) is None
    assert levels.weight_block_shape((8,), (4, 1)) is None
    assert levels.weight_block_shape((8, 3), (1, 1)) is None  # a single weight
    assert levels.weight_block_shape((8, 3), None) is None


def test_block_sizes_count_partial_edge_blocks():
    np.testing.assert_array_equal(
        levels.block_sizes((5, 3), (2, 2)), [[4, 2], [4, 2], [2, 1]]
    )
    np.testing.assert_array_equal(levels.block_sizes((3, 2), (4, 1)), [[3, 3]])


def test_block_reduce_averages_what_each_block_holds():
    a = np.arange(15.0).reshape(5, 3)  # rows [0 1 2] [3 4 5] ... [12 13 14]
    np.testing.assert_array_equal(
        levels.block_reduce(a, (2, 2)),
        [
            [(0 + 1 + 3 + 4) / 4, (2 + 5) / 2],
            [(6 + 7 + 9 + 10) / 4, (8 + 11) / 2],
            [(12 + 13) / 2, 14],
        ],
    )
    np.testing.assert_array_equal(levels.block_reduce(a, (1, 1)), a)
    np.testing.assert_array_equal(
        levels.block_reduce(np.array([[True], [True], [False]]), (2, 1)), [[1], [0]]
    )


def test_block_expand_undoes_block_reduce_on_block_constant_arrays():
    blocks = np.array([[1, 2], [3, 4], [5, 6]], np.uint8)
    full = levels.block_expand(blocks, (2, 2), (5, 3))
    np.testing.assert_array_equal(
        full,
        [[1, 1, 2], [1, 1, 2], [3, 3, 4], [3, 3, 4], [5, 5, 6]],
    )
    assert full.dtype == np.uint8
    np.testing.assert_array_equal(levels.block_reduce(full, (2, 2)), blocks)


def test_block_expand_checks_the_block_grid():
    with pytest.raises(ValueError, match=r"has \(3, 2\) blocks.*shape \(2, 2\)"):
        levels.block_expand(np.zeros((2, 2)), (2, 2), (5, 3))


def test_select_top_units_keeps_best_units_to_the_nearest_count():
    scores = np.array([0.9, 0.5, 0.7, 0.1])
    sizes = np.array([4, 4, 2, 4])
    everyone = np.ones(4, bool)
    # Ranked: 0 (4), 2 (+2 = 6), 1 (+4 = 10), 3 (+4 = 14).
    for n_keep, expected in [
        (0, [0, 0, 0, 0]),
        (1, [0, 0, 0, 0]),  # 0 is nearer 1 than 4 is
        (3, [1, 0, 0, 0]),
        (4, [1, 0, 0, 0]),
        (5, [1, 0, 0, 0]),  # 4 and 6 are as near: the smaller wins
        (6, [1, 0, 1, 0]),
        (9, [1, 1, 1, 0]),
        (14, [1, 1, 1, 1]),
        (99, [1, 1, 1, 1]),  # clipped
        (-1, [0, 0, 0, 0]),
    ]:
        np.testing.assert_array_equal(
            levels.select_top_units(scores, sizes, everyone, n_keep),
            np.array(expected, bool),
            err_msg=f"n_keep={n_keep}",
        )


def test_select_top_units_respects_candidates_and_breaks_ties_by_position():
    scores = np.zeros([2, 3])
    sizes = np.full([2, 3], 2)
    candidates = np.array([[False, True, True], [True, True, False]])
    keep = levels.select_top_units(scores, sizes, candidates, 4)
    np.testing.assert_array_equal(keep, [[False, True, True], [False, False, False]])
    keep = levels.select_top_units(scores, sizes, candidates, 100)
    np.testing.assert_array_equal(keep, candidates)


def test_select_top_units_of_size_1_keeps_what_select_top_keeps():
    scores = np.random.default_rng(0).normal(size=(6, 5))
    candidates = scores > -1.0
    for n_keep in [0, 3, 11, 30]:
        np.testing.assert_array_equal(
            levels.select_top_units(scores, np.ones_like(scores), candidates, n_keep),
            levels.select_top(scores, candidates, n_keep),
        )


def test_unused_units_marks_every_entry_of_a_unit_that_keeps_no_weight():
    kept = np.array([[True, False, False], [False, False, True]])
    np.testing.assert_array_equal(
        levels.unused_units(kept),
        [[False, True, False], [False, True, False]],
    )
    # A convolution kernel: the unit is the last axis, over all taps and inputs.
    kernel = np.zeros((2, 2, 3, 4), bool)
    kernel[1, 0, 2, 0] = kernel[0, 1, 0, 3] = True
    unused = levels.unused_units(kernel)
    assert unused.shape == kernel.shape
    np.testing.assert_array_equal(unused[0, 0, 0], [False, True, True, False])
    assert unused[..., 1].all() and not unused[..., 0].any()
