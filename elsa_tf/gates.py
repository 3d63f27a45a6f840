"""Pure math of polarized channel gates: tensors and arrays in, tensors out.

`PolarizedGates` (`elsa_tf.polarized_gates`) gives every free channel a gate
`gamma` in [0, 1]. Here is what it computes with them, with no Keras object:

* the forward gate, binary with a straight-through gradient
  (`straight_through`): 1 where `gamma >= 0.5`, and the gradient of `gamma`;
* the polarization regularizer of Zhuang et al. (NeurIPS 2020),
  `R(gamma) = t * sum|gamma_i| - sum|gamma_i - mean(gamma)|`
  (`polarization`), whose minimiser keeps a fraction `1/2 - t/4` of the gates
  at 1 and the rest at 0, so `t = 2 - 4k` aims at a keep ratio `k`
  (`polarization_t`, `kept_fraction`);
* the share penalty (`share_penalty`): the distance from the gates to the
  nearest binary gates that keep the target count, which pulls the gates'
  own kept count onto the target;
* the gated weights: each channel's "out" slices (its filter, bias and
  normalization parameters) times its gate (`gate_weights`), so that a gate
  at 0 makes the channel output exactly what a removed channel does;
* the count of gates still undecided at the end of a level
  (`undecided_count`), and a gate's update (`gate_step`: a plain gradient
  step, clamped to [0, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from elsa_tf.channel_levels import GroupLayout

# A gate is on (its channel computes) from here up.
THRESHOLD = 0.5
# How far a tie-break `order` (in [-0.5, 0.5]) shifts a gate when ranking
# gates for the share penalty: it orders gates within 1e-3 of each other
# (equal ones, at 0 or 1, above all) and no others.
TIE_BREAK = 2e-3
# Gates strictly between these are "undecided" when a level is hardened:
# within 5% of either end counts as decided.
UNDECIDED_LOW, UNDECIDED_HIGH = 0.05, 0.95


def straight_through(gamma):
    """The forward gate: `step(gamma) = [gamma >= 0.5]`, with the gradient
    of `gamma` (`gamma + stop_gradient(step(gamma) - gamma)`).

    Example:
        >>> straight_through(tf.constant([0.2, 0.5, 0.9])).numpy().tolist()
        [0.0, 1.0, 1.0]
    """
    gamma = tf.convert_to_tensor(gamma)
    hard = tf.cast(gamma >= THRESHOLD, gamma.dtype)
    return gamma + tf.stop_gradient(hard - gamma)


def polarization_t(keep):
    """The `t` whose polarization minimiser keeps a fraction `keep`: `2 - 4k`."""
    return 2.0 - 4.0 * keep


def kept_fraction(t):
    """The fraction of gates at 1 that minimises `polarization(., t)`, for
    `-2 <= t <= 2`: `1/2 - t/4` (Zhuang et al., 2020, up to one gate)."""
    return 0.5 - t / 4.0


def polarization(gamma, t):
    """`R(gamma) = t * sum|gamma_i| - sum|gamma_i - mean(gamma)|`.

    Args:
        gamma: a 1-D tensor of gates (one mean over all of them).
        t: a scalar; see `polarization_t`.

    Example:
        >>> float(polarization(tf.constant([1.0, 1.0, 0.0, 0.0]), 1.0))
        0.0
    """
    gamma = tf.convert_to_tensor(gamma)
    t = tf.cast(t, gamma.dtype)
    mean = tf.reduce_mean(gamma)
    return t * tf.reduce_sum(tf.abs(gamma)) - tf.reduce_sum(tf.abs(gamma - mean))


def share_penalty(gamma, target, order=None):
    """The L1 distance from the gates to the nearest binary gates that keep
    `target` of them: the `target` largest at 1, the others at 0.

    Zero exactly when the gates are binary and keep the target count; each
    gate is pulled towards its side of that split, so the gates' kept count
    moves onto the target one gate at a time, and a gate that the
    polarization regularizer alone would leave just off (between the mean
    and 0.5) goes to 0. A plain `|kept - target|` through the
    straight-through gradient pulls every gate alike: equal gates then cross
    the threshold together, and gates hover at it.

    Args:
        gamma: a 1-D tensor of gates.
        target: how many to keep (rounded to the nearest int).
        order: optional tie-break, same shape as `gamma`, in [-0.5, 0.5]:
            among (nearly) equal gates the larger `order` ranks first.

    Example:
        >>> round(float(share_penalty(tf.constant([0.9, 0.2, 0.6]), 1.0)), 4)
        0.9
    """
    gamma = tf.convert_to_tensor(gamma)
    key = gamma if order is None else gamma + TIE_BREAK * tf.cast(order, gamma.dtype)
    rank = tf.argsort(tf.argsort(-key, stable=True), stable=True)
    count = tf.cast(tf.round(tf.cast(target, gamma.dtype)), rank.dtype)
    nearest = tf.stop_gradient(tf.cast(rank < count, gamma.dtype))
    return tf.reduce_sum(tf.abs(gamma - nearest))


def undecided_count(gammas: Sequence[np.ndarray]) -> int:
    """How many gates lie strictly between 0.05 and 0.95."""
    return sum(
        int(np.count_nonzero((g > UNDECIDED_LOW) & (g < UNDECIDED_HIGH)))
        for g in (np.asarray(g) for g in gammas)
    )


def gate_step(gamma, grad, learning_rate: float):
    """A projected gradient step on gates: `clip(gamma - lr * grad, 0, 1)`."""
    step = tf.cast(learning_rate, gamma.dtype) * tf.cast(grad, gamma.dtype)
    return tf.clip_by_value(gamma - step, 0.0, 1.0)


def gate_weights(
    values,
    gates,
    groups: Sequence[GroupLayout],
    free: Sequence[np.ndarray],
):
    """The prunable weights with each free channel's "out" slices times its gate.

    Args:
        values: the prunable weights' values (tensors).
        gates: one tensor of forward gates per group of `groups` (binary,
            from `straight_through`); None for a group that is not gated.
        groups: the layout of the unpinned groups.
        free: one boolean array per group: the channels a gate acts on. The
            others (frozen channels) are always on.

    Returns:
        The gated values, one per weight; a weight no gate acts on is
        returned as it is.
    """
    values = list(values)
    for group, gate, is_free in zip(groups, gates, free):
        if gate is None or not np.any(is_free):
            continue
        gate = tf.where(tf.constant(np.asarray(is_free, bool)), gate, 1.0)
        for piece in group.slices:
            if piece.role != "out":
                continue
            value = values[piece.weight]
            gate_of = np.tile(np.arange(group.size), piece.indices.size // group.size)
            per_index = tf.gather(tf.cast(gate, value.dtype), gate_of)
            length = value.shape[piece.axis]
            if np.array_equal(piece.indices, np.arange(length)):
                factor = per_index
            else:
                factor = tf.tensor_scatter_nd_update(
                    tf.ones([length], value.dtype),
                    piece.indices.reshape(-1, 1),
                    per_index,
                )
            shape = [1] * len(value.shape)
            shape[piece.axis] = length
            values[piece.weight] = value * tf.reshape(factor, shape)
    return values
