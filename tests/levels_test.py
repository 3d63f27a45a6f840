"""The pure level math, on fixtures small enough to check by hand."""

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
    pruned = levels.prune_map(m, keep, 1)
    np.testing.assert_array_equal(pruned, [0, 1, U, 1])  # frozen weight untouched
    np.testing.assert_array_equal(levels.open_map(pruned, 2), [0, 1, 2, 1])


def test_level_counts_are_cumulative():
    m = _map([0, 1, 1, 2, U, U])
    np.testing.assert_array_equal(levels.level_counts(m, 3), [1, 3, 4])


def test_project_update_keeps_frozen_takes_current_zeroes_the_rest():
    m = tf.constant([0, 1, 1, U], tf.uint8)
    old = tf.constant([1.0, 2.0, 3.0, 4.0])
    new = tf.constant([9.0, 8.0, 7.0, 6.0])
    np.testing.assert_array_equal(levels.project_update(old, new, m, 1), [1, 8, 7, 0])
    np.testing.assert_array_equal(levels.project_update(None, new, m, 0), [9, 0, 0, 0])
