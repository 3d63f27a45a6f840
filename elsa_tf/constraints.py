"""How an optimizer step may change each variable of an embedded model.

The rule of every variable is the owning `ElsaModel`'s (`variable_rule`):
a prunable weight's updates are projected onto the level being trained, a
shared weight is frozen whole once level 0 is finished (unless
`shared="per_level"`), channel gates take their own step, clamped to [0, 1].
This module only finds the owner of a variable, since an optimizer is handed
variables, not models: `ElsaModel` registers each variable it owns here.
`FreezingOptimizer` asks `training_constraint` for each variable it is
handed; a variable that no embedded model owns is an error, never "train
freely".
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref

import tensorflow as tf

from elsa_tf import gates, levels

FROZEN = "frozen"
FREE = "free"
# The index `register` records for the gates of a gated sparsifier.
GATE = "gate"

# id(variable) -> (weak owner, index into its level maps, None for a shared
# weight, or GATE). The optimizer only sees variables.
_OWNERS: dict[int, tuple[weakref.ref, int | str | None]] = {}


def register(variable, owner, index: int | str | None) -> None:
    """Records that `owner` (an `ElsaModel`) governs `variable`."""
    key = id(variable)
    _OWNERS[key] = (weakref.ref(owner), index)
    weakref.finalize(variable, _OWNERS.pop, key, None)


class Projection:
    """Maps an optimizer's update of a prunable weight back onto the level.

    `project(old, new)` keeps frozen entries at `old`, the current level's
    entries at `new`, and every other entry at zero, or at `new` when
    `zero_unused` is False (a sparsifier with feedback trains its pruned
    weights). The level is read from `level` when the step runs (a variable,
    or a tensor reading one), so one traced step serves every level after
    the first; `old` is only needed once some level is finished
    (`needs_old`, which `finished` says).
    """

    def __init__(self, level_map, level, finished: bool, zero_unused: bool = True):
        self.level_map = level_map
        self.level = level
        self.zero_unused = zero_unused
        self.needs_old = bool(finished)

    def __call__(self, old, new):
        level = self.level() if callable(self.level) else self.level
        return levels.project_update(
            old if self.needs_old else None,
            new,
            self.level_map.value,
            level,
            self.zero_unused,
        )


class FrozenAfterFirstLevel:
    """A shared weight that trains with level 0 and is frozen after it, in a
    step traced once for every level: the inner optimizer's update is taken,
    then undone from the copy taken before it (exactly) once the level read
    from `level` (called when the step runs) is past 0.

    The inner optimizer's slots for the weight keep moving after level 0;
    they are never used again, since the weight never trains again.
    """

    needs_old = True

    def __init__(self, level):
        self.level = level

    def gradient(self, grad):
        """The gradient the inner optimizer sees: zero once frozen, so that
        it does not count in a global gradient norm (`global_clipnorm`)."""
        return tf.where(self.level() > 0, tf.zeros_like(grad), grad)

    def __call__(self, old, new):
        return tf.where(self.level() > 0, old, new)


class GateStep:
    """The update of channel gates: not the inner optimizer's, but their own
    projected gradient step, `clip(gamma - learning_rate * grad, 0, 1)`
    (`gates.gate_step`), as Zhuang et al. train theirs with SGD.

    Adam would scale every gate's step to about its learning rate whatever
    the gradient's size, so the gates of a group, pushed alike by the share
    penalty, would move in lockstep and cross the threshold together; with
    plain steps the task's gradient keeps its weight in which gate gives way.
    """

    def __init__(self, learning_rate: float):
        self.learning_rate = float(learning_rate)

    def __call__(self, value, grad):
        return gates.gate_step(value, grad, self.learning_rate)


def training_constraint(variable):
    """How an optimizer step may change `variable`.

    Returns:
        `FREE` to update it freely (a shared weight still training),
        `FROZEN` to leave it untouched (a shared weight after level 0, except
        under `shared="per_level"`), a `Projection` for a prunable weight, or
        a `GateStep` for channel gates. The
        answer is fixed when a train step is traced, for the model's
        `trace_key`: see `elsa_tf.compiled_functions`.

    Raises:
        ValueError: if no embedded model owns `variable`.
    """
    entry = _OWNERS.get(id(variable))
    owner = entry[0]() if entry else None
    if owner is None:
        raise ValueError(
            "FreezingOptimizer was handed a variable that no embedded model "
            "owns, so it cannot tell whether the variable is frozen. Train "
            "only the model returned by elsa_tf.embed (or loaded from its "
            f"file). Received: variable={getattr(variable, 'path', variable)!r}"
        )
    return owner.variable_rule(entry[1])


# True while elsa_tf itself runs a model in training mode outside a level's
# training (BatchNormalization recalibration), which is not a user's mistake.
_INTERNAL_TRAINING = contextvars.ContextVar("elsa_internal_training", default=False)


@contextlib.contextmanager
def internal_training():
    """Marks forward passes in training mode that are elsa_tf's own."""
    token = _INTERNAL_TRAINING.set(True)
    try:
        yield
    finally:
        _INTERNAL_TRAINING.reset(token)


def is_internal_training() -> bool:
    return _INTERNAL_TRAINING.get()
