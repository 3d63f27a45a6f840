"""Level budgets: how many epochs each level of an embedded model trains.

`epochs_per_level` (of `elsa_tf.fit`, `LevelScheduler` and `elsa-train`) is
one int, the same for every level, or a list with one entry per level of the
model, sparsest first. Later levels start from a network that already works
(the level before them), so they can train for less: `front_loaded` makes
such a list from the budget of one separately trained model.

Pure Python: no Keras objects.
"""

from __future__ import annotations

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
    epochs: int, num_levels: int, share: float = 0.5, decay: float = 0.5
) -> list[int]:
    """A budget that gives the sparsest level the most epochs, later ones less.

    The sparsest level trains from scratch, as a separately trained model
    does, so it gets that model's `epochs`. Every later level starts from
    the level before it and shares what is left of `share` times the epochs
    of `num_levels` separate models, each level's share `decay` times the
    one before it's (halving by default; 1 splits it evenly), at least one
    epoch each.

    Args:
        epochs: the epochs of one separately trained (one-level) model.
        num_levels: the number of levels.
        share: ELSA's total epochs as a share of the separate models' total,
            `epochs * num_levels`.
        decay: the ratio of a level's share of the later epochs to the
            previous level's, in (0, 1].

    Returns:
        One positive int per level, sparsest first; they sum to
        `round(share * epochs * num_levels)` where that leaves at least one
        epoch for every level after the first, more otherwise.

    Raises:
        ValueError: for `epochs` or `num_levels` below 1, or `share` or
            `decay` outside (0, 1].

    >>> front_loaded(6, 4)
    [6, 3, 2, 1]
    >>> front_loaded(6, 4, share=0.33)
    [6, 1, 1, 1]
    >>> front_loaded(6, 4, decay=1.0)
    [6, 2, 2, 2]
    """
    for name, value in (("epochs", epochs), ("num_levels", num_levels)):
        if not _is_int(value) or value < 1:
            raise ValueError(
                f"{name} must be a positive int. Received: {name}={value!r}"
            )
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1]. Received: share={share!r}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1]. Received: decay={decay!r}")
    if num_levels == 1:
        return [epochs]
    later = max(round(share * epochs * num_levels) - epochs, num_levels - 1)
    # Shares 1, decay, decay^2, ... of `later`, at least one epoch each; the
    # epochs above that go one by one to the level furthest below its share
    # (the earlier on a tie), which keeps the list non-increasing.
    weights = [decay**k for k in range(num_levels - 1)]
    share_of = [later * w / sum(weights) for w in weights]
    counts = [1] * (num_levels - 1)
    for _ in range(later - sum(counts)):
        k = max(range(len(counts)), key=lambda k: share_of[k] - counts[k])
        counts[k] += 1
    return [epochs, *counts]
