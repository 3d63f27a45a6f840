"""How sparsity ramps up inside one level, through tfmot pruning schedules.

A `LevelSchedule` is a serializable recipe: given a level's target sparsity
and its length in steps, it builds the tfmot `PruningSchedule` that drives the
level (`PolynomialDecay` by default, `ConstantSparsity` accepted). tfmot is
imported only when a schedule is built, since importing it pulls in tf_keras.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

_KINDS = ("polynomial_decay", "constant")
_LEGACY_KERAS = "TF_USE_LEGACY_KERAS"


@keras.saving.register_keras_serializable(package="elsa_tf")
class LevelSchedule:
    """The pruning schedule used inside every level.

    Each level starts with all its free weights kept and, over the steps from
    `begin_fraction` to `end_fraction` of the level, prunes them down to the
    level's target sparsity; the rest of the level fine-tunes with a fixed mask.

    Args:
        kind: `"polynomial_decay"` (tfmot `PolynomialDecay`, the default) or
            `"constant"` (tfmot `ConstantSparsity`: prune to the target at once).
        power: exponent of the polynomial decay; 3, as in tfmot and Zhu & Gupta.
        begin_fraction: fraction of the level's steps before pruning starts;
            0, since the level's free weights start from where the previous
            level left them.
        end_fraction: fraction of the level's steps by which the target is
            reached; 0.75 leaves a quarter of the level to recover accuracy.
        frequency: steps between mask updates, or None for about 20 updates
            a level (tfmot's fixed default of 100 is longer than many levels).

    Example:

    >>> schedule = LevelSchedule("polynomial_decay", end_fraction=0.5)
    >>> LevelSchedule.from_config(schedule.get_config()) == schedule
    True
    """

    def __init__(
        self,
        kind: str = "polynomial_decay",
        power: float = 3.0,
        begin_fraction: float = 0.0,
        end_fraction: float = 0.75,
        frequency: int | None = None,
    ):
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}. Received: kind={kind!r}")
        if not 0.0 <= begin_fraction < end_fraction <= 1.0:
            raise ValueError(
                "Need 0 <= begin_fraction < end_fraction <= 1. Received: "
                f"begin_fraction={begin_fraction}, end_fraction={end_fraction}"
            )
        if frequency is not None and (
            isinstance(frequency, bool)
            or not isinstance(frequency, int)
            or frequency < 1
        ):
            raise ValueError(
                "frequency must be a positive int or None. "
                f"Received: frequency={frequency!r}"
            )
        if power <= 0:
            raise ValueError(f"power must be positive. Received: power={power}")
        self.kind = kind
        self.power = float(power)
        self.begin_fraction = float(begin_fraction)
        self.end_fraction = float(end_fraction)
        self.frequency = frequency

    def steps(self, level_steps: int) -> tuple[int, int, int]:
        """Returns `(begin_step, end_step, frequency)` for a level of that length.

        The end step is aligned on the frequency so that the last mask update
        lands exactly on the target sparsity.
        """
        begin = int(self.begin_fraction * level_steps)
        span = max(int(self.end_fraction * level_steps) - begin, 1)
        frequency = self.frequency or max(span // 20, 1)
        frequency = min(frequency, span)
        end = begin + (span // frequency) * frequency
        return begin, end, frequency

    def build(self, target_sparsity: float, level_steps: int):
        """The tfmot `PruningSchedule` for one level.

        Args:
            target_sparsity: the level's sparsity, over its prunable weights.
            level_steps: the number of training steps in the level.
        """
        sparsity = _tfmot_sparsity()
        begin, end, frequency = self.steps(level_steps)
        if self.kind == "constant":
            return sparsity.ConstantSparsity(
                target_sparsity, begin_step=begin, end_step=end, frequency=frequency
            )
        return sparsity.PolynomialDecay(
            initial_sparsity=0.0,
            final_sparsity=target_sparsity,
            begin_step=begin,
            end_step=end,
            power=self.power,
            frequency=frequency,
        )

    def get_config(self) -> dict:
        return {
            "kind": self.kind,
            "power": self.power,
            "begin_fraction": self.begin_fraction,
            "end_fraction": self.end_fraction,
            "frequency": self.frequency,
        }

    @classmethod
    def from_config(cls, config: dict) -> LevelSchedule:
        return cls(**config)

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, LevelSchedule) and self.get_config() == other.get_config()
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"LevelSchedule({args})"


def update_steps(schedule, level_steps: int, interval=None) -> dict[int, float]:
    """Step -> sparsity for every step at which the level's masks update.

    Without an `interval`, the steps at which the tfmot schedule prunes;
    with one (a sparsifier's `update_interval`), every `interval` steps from
    the schedule's first pruning step to the level's end, at the sparsity
    the schedule gives for that step.
    """
    steps = tf.range(level_steps, dtype=tf.int64)
    should, sparsity = schedule(steps)
    should = np.broadcast_to(np.asarray(should), (level_steps,))
    sparsity = np.broadcast_to(np.asarray(sparsity, np.float64), (level_steps,))
    if interval is None:
        chosen = np.flatnonzero(should)
    else:
        first = int(np.flatnonzero(should)[0]) if should.any() else 0
        chosen = np.arange(first, level_steps, interval)
    return {int(s): float(sparsity[s]) for s in chosen}


def _tfmot_sparsity():
    """tfmot's `sparsity.keras` module, imported without side effects.

    Importing tfmot sets TF_USE_LEGACY_KERAS=1 for the whole process, which
    would silently turn a user's later `tf.keras` into Keras 2. Its schedules
    are plain TF ops and need none of that, so the variable is put back.
    """
    before = os.environ.get(_LEGACY_KERAS)
    try:
        from tensorflow_model_optimization.sparsity import keras as sparsity
    finally:
        if before is None:
            os.environ.pop(_LEGACY_KERAS, None)
        else:
            os.environ[_LEGACY_KERAS] = before
    return sparsity


def get(identifier) -> LevelSchedule:
    """Resolves what a user passes as `schedule` to a `LevelSchedule`.

    Accepts a `LevelSchedule`, its config dict, one of the strings
    `"polynomial_decay"` / `"constant"`, or the tfmot classes `PolynomialDecay`
    / `ConstantSparsity` themselves.
    """
    if identifier is None:
        return LevelSchedule()
    if isinstance(identifier, LevelSchedule):
        return identifier
    if isinstance(identifier, str):
        return LevelSchedule(kind=identifier)
    if isinstance(identifier, dict):
        if "class_name" in identifier:  # keras.saving.serialize_keras_object's
            return get(keras.saving.deserialize_keras_object(identifier))
        return LevelSchedule.from_config(identifier)
    name = getattr(identifier, "__name__", None)
    if isinstance(identifier, type) and name in ("PolynomialDecay", "ConstantSparsity"):
        return LevelSchedule(
            kind="polynomial_decay" if name == "PolynomialDecay" else "constant"
        )
    raise TypeError(
        "schedule must be a LevelSchedule, 'polynomial_decay', 'constant', or "
        "tfmot's PolynomialDecay / ConstantSparsity class. "
        f"Received: schedule={identifier!r}"
    )
