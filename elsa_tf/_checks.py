"""Argument checks that several training options share, named by option.

Pure Python. Each raises a ValueError that names the option and the value
received, as Keras's own constructors do.
"""

from __future__ import annotations

import math
import numbers


def is_int_at_least(value, low: int) -> bool:
    """Whether `value` is an int (not a bool) of at least `low`."""
    return (
        not isinstance(value, bool)
        and isinstance(value, numbers.Integral)
        and value >= low
    )


def check_share(share, what: str) -> float:
    """`share` as a float; ValueError unless it is a finite number in [0, 1).

    Args:
        share: the value to check.
        what: the option it belongs to, for the message ("sieving").
    """
    if (
        isinstance(share, bool)
        or not isinstance(share, numbers.Real)
        or not math.isfinite(share)
        or not 0.0 <= float(share) < 1.0
    ):
        raise ValueError(
            f"The {what} share must be a number in [0, 1). Received: share={share!r}"
        )
    return float(share)


def check_interval(interval, what: str) -> int:
    """`interval` as an int; ValueError unless it is an int of at least 1.

    Args:
        interval: the value to check, in epochs.
        what: the option it belongs to, for the message ("sieving").
    """
    if not is_int_at_least(interval, 1):
        raise ValueError(
            f"The {what} interval must be an int of at least 1 epoch. "
            f"Received: interval={interval!r}"
        )
    return int(interval)
