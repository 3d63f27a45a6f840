"""Level budgets: how many epochs each level of an embedded model trains.

`epochs_per_level` (of `elsa_tf.fit`, `LevelScheduler` and `elsa-train`) is
one int, the same for every level, or a list with one entry per level of the
model, sparsest first. Later levels start from a network that already works
(the level before them), so they can train for less: `front_loaded` makes
such a list from the budget of one separately trained model.

Pure Python: no Keras objects.
"""

from __future__ import annotations

import math
import numbers


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_epochs_per_level(epochs_per_level, num_levels: int | None = None):
    """`epochs_per_level` as an int, or as a list of ints, one per level.

    Args:
        epochs_per_level: a positive int, or a sequence of positive ints.
        num_levels: the model's number of levels, which a list must match;
            None to check the entries only.

    Returns:
        The int, or a list of ints.

    Raises:
        ValueError: for a non-positive or non-int value or entry, an empty
            list, or a list whose length is not `num_levels`.
    """
    if _is_int(epochs_per_level):
        if epochs_per_level < 1:
            raise ValueError(
                "epochs_per_level must be a positive int or a list of them. "
                f"Received: epochs_per_level={epochs_per_level!r}"
            )
        return int(epochs_per_level)
    if isinstance(epochs_per_level, (str, bytes)) or not hasattr(
        epochs_per_level, "__iter__"
    ):
        raise ValueError(
            "epochs_per_level must be a positive int or a list of them, one "
            f"per level. Received: epochs_per_level={epochs_per_level!r}"
        )
    budget = list(epochs_per_level)
    bad = [e for e in budget if not _is_int(e) or e < 1]
    if not budget or bad:
        raise ValueError(
            "Every entry of epochs_per_level must be a positive int. Received: "
            f"epochs_per_level={budget!r}"
        )
    if num_levels is not None and len(budget) != num_levels:
        raise ValueError(
            f"epochs_per_level has {len(budget)} entries for a model of "
            f"{num_levels} levels; give one per level, sparsest first. "
            f"Received: epochs_per_level={budget!r}"
        )
    return [int(e) for e in budget]


def level_epochs(epochs_per_level, num_levels: int) -> list[int]:
    """The epochs of each of the model's `num_levels` levels.

    >>> level_epochs(3, 2)
    [3, 3]
    >>> level_epochs([6, 2, 1], 3)
    [6, 2, 1]
    """
    budget = check_epochs_per_level(epochs_per_level, num_levels)
    return [budget] * num_levels if isinstance(budget, int) else budget


def front_loaded(
    epochs: int, num_levels: int, *, later: float = 0.5, decay: float = 1.0
) -> list[int]:
    """A budget that gives the sparsest level the most epochs, later ones less.

    The sparsest level trains from scratch, as a separately trained model
    does, so it gets that model's `epochs`. Every later level starts from
    the network of the level before it, which already works, and gets
    `later` times as many epochs, times `decay` once more for each level
    after the first later one, rounded, at least one.

    The default, half the epochs for every later level ([6, 3, 3, 3] for 6
    epochs and 4 levels: 0.625 of the separate models' epochs), was measured
    against halving (`decay=0.5`: [6, 3, 2, 1], 0.5 of their epochs) and an
    even cut ([3, 3, 3, 3]) in `benchmarks/training_budget.py`: it kept
    every level within 0.5 points of separately trained models on digits
    and MNIST-1D; halving lost 1.3 points at MNIST-1D's dense level, which
    has the most weights to train anew; the even cut lost 2 to 15 points at
    the sparsest level.

    Args:
        epochs: the epochs of one separately trained (one-level) model.
        num_levels: the number of levels.
        later: the epochs of the first level after the sparsest, as a share
            of `epochs`, in (0, 1].
        decay: the ratio of each later level's epochs to the one before
            it's, in (0, 1].

    Returns:
        One positive int per level, sparsest first, non-increasing.

    Raises:
        ValueError: for `epochs` or `num_levels` below 1, or `later` or
            `decay` outside (0, 1].

    >>> front_loaded(6, 4)
    [6, 3, 3, 3]
    >>> front_loaded(6, 4, decay=0.5)
    [6, 3, 2, 1]
    >>> front_loaded(6, 4, later=0.1)
    [6, 1, 1, 1]
    """
    for name, value in (("epochs", epochs), ("num_levels", num_levels)):
        if not _is_int(value) or value < 1:
            raise ValueError(
                f"{name} must be a positive int. Received: {name}={value!r}"
            )
    for name, value in (("later", later), ("decay", decay)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be in (0, 1]. Received: {name}={value!r}")
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must be in (0, 1]. Received: {name}={value!r}")
    # Rounded half up (not to even): 1.5 epochs are 2.
    return [epochs] + [
        max(1, math.floor(epochs * later * decay**k + 0.5))
        for k in range(num_levels - 1)
    ]
