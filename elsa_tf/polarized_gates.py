"""`PolarizedGates`: channel levels chosen by trained gates, in one pass.

A one-pass version of the consensus sub-network of Zhi et al. (arXiv
2302.10798), on the polarization regularizer of Zhuang et al. (NeurIPS
2020). At channel granularity, every free channel (one of an unpinned group,
not kept by a finished level) has a gate `gamma` in [0, 1], held by the
model (`ElsaModel.gates`, one variable over all groups). While a level
trains:

* the forward pass multiplies each free channel's "out" slices (its filter,
  bias and normalization scale and shift) by the binary gate
  `[gamma >= 0.5]`, with a straight-through gradient to `gamma`, so a gate at
  0 computes exactly what the level without that channel computes;
* the loss adds `strength * R(gamma)`, the polarization regularizer aimed at
  the level's keep share, plus `share_strength` times the share penalty (the
  L1 distance from the gates to the nearest binary gates that keep the
  target count; ties go to the channel with the larger weights), which makes
  the gates' own kept count meet the target; the target follows the level's
  tfmot schedule (the model's `gate_keep`, set at every mask update, so
  nothing is retraced);
* the gates take their own projected gradient step, of learning rate
  `gate_learning_rate`, clamped to [0, 1] (`constraints.GateStep`), not the
  weights' optimizer's.

A gate that is on gets the task's gradient (the first-order effect of
scaling its channel). One that is off gets it only where its channel's
output is linear in the gate: behind a ReLU, whose slope at 0 is 0, it gets
none, and only the share penalty brings it back.

The level's masks do not change while it trains: the gates are its mask.
At its end (the mask update with `step=None`) the gates are hardened: the
level keeps, per group (or across groups with `selection="global"`), the
exact target count of channels with the largest gates, and that is its level
map; dropped channels are zeroed, kept gates set to 1, and the model records
how many gates were still undecided (strictly between 0.05 and 0.95;
`summary`'s `undecided_gates`). Gates never reach inference: `extract`,
`export_tflite`, `set_level` and the level maps hold none.

The math is in `elsa_tf.gates`; the model holds the gates (`ElsaModel`) and
`elsa_tf.model_ops` sets their targets and hardens them.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from elsa_tf import channel_levels, levels
from elsa_tf import gates as gates_lib
from elsa_tf import sparsifiers as sparsifiers_lib

SELECTIONS = ("per_layer", "global")
# Defaults measured on the digits CNN (levels 0.75, 0.5, 0.0 at channel
# granularity, 3 epochs a level, Adam 3e-3, seed 0; see the README). With
# plain steps a gate moves by gate_learning_rate times the sum of the task's
# gradient (about 0.005 to 0.05 per gate there), the regularizer's and the
# penalty's.
# 0.05: Zhuang et al.'s 1e-4 suits 160-epoch SGD runs; here it left the
# sparsest level at 22% (0.05: 82%), and with share_strength 1e-4 too no gate
# moved at all.
DEFAULT_STRENGTH = 5e-2
# 0.2: above the task's gradient on most gates, so each mask update's target
# is met within a few steps and the hardening trims nothing (strengths 0.02
# and 0.1 left the sparsest level one or two channels over its target, and
# the trim cost it 40 points).
DEFAULT_SHARE_STRENGTH = 0.2
# 0.75: every gate starts on (the level starts with all its channels, as
# magnitude pruning's does), a quarter away from the threshold. At 0.5,
# Zhuang et al.'s value, exactly on the threshold, the sparsest level's gates
# crossed it 161 times (84 needed) and the level scored 67% (0.75: 82%).
DEFAULT_INITIAL_VALUE = 0.75
# 0.5: the penalty then moves a gate by 0.1 a step, across [0, 1] in about
# ten steps, so a level needs about ten steps after its schedule's ramp;
# 2.0 switched channels on and off more (97 crossings for 84) for a worse
# level.
DEFAULT_GATE_LEARNING_RATE = 0.5


def _check_number(name, value, low, high=math.inf, low_open=False):
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(
        value, bool
    )
    ok = ok and math.isfinite(value) and value <= high
    ok = ok and (value > low if low_open else value >= low)
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(
            f"{name} must be a number in {bracket}{low}, {high}]. "
            f"Received: {name}={value!r}"
        )
    return float(value)


@keras.saving.register_keras_serializable(package="elsa_tf")
class PolarizedGates(sparsifiers_lib.Sparsifier):
    """Polarized channel gates (Zhuang et al. 2020; one pass, Zhi et al.).

    See the module docstring. Needs `granularity="channel"`, which is not the
    default anywhere in elsa_tf, so it is asked for explicitly:
    `PolarizedGates(granularity="channel")`, or
    `elsa_tf.embed(model, sparsities, sparsifier="polarized_gates",
    granularity="channel")`.

    Args:
        strength: lambda, the weight of the polarization regularizer.
        share_strength: the weight of the share penalty
            (`gates.share_penalty`), which pulls the gates' kept count onto
            the level's target.
        initial_value: where every free gate starts at each level, in
            [0.5, 1] (on: a gate below 0.5 would start its channel off, with
            no gradient to its weights).
        gate_learning_rate: the learning rate of the gates' own projected
            gradient step (> 0); the weights keep their optimizer.
        selection: `"per_layer"` (each group keeps its share: one
            regularizer, mean and target per group) or `"global"` (one
            regularizer over every free gate, with one mean, as in Zhuang et
            al.'s code, and one target; every group keeps at least one
            channel). `"lamp"` is refused: gates share one scale already.
        granularity: must be `"channel"`; `"weight"` (the default, as for
            every sparsifier) is refused, not silently switched.
        channel_norm: orders the channels by the norm of their weights
            (`channel_order`): ties between gates, in the share penalty and
            when a level is hardened, go to the larger.
        update_interval: steps between target updates, or None for the
            level's schedule.

    Raises:
        ValueError: for a granularity other than `"channel"`, a selection
            other than `"per_layer"` or `"global"`, or an option out of range.

    Example:

    >>> gates = PolarizedGates(granularity="channel")
    >>> PolarizedGates.from_config(gates.get_config()) == gates
    True
    """

    gated = True

    def __init__(
        self,
        strength: float = DEFAULT_STRENGTH,
        share_strength: float = DEFAULT_SHARE_STRENGTH,
        initial_value: float = DEFAULT_INITIAL_VALUE,
        gate_learning_rate: float = DEFAULT_GATE_LEARNING_RATE,
        selection: str = "per_layer",
        granularity: str = "weight",
        channel_norm: str = sparsifiers_lib.DEFAULT_CHANNEL_NORM,
        update_interval=None,
    ):
        if granularity != "channel":
            raise ValueError(
                "PolarizedGates gates whole channels, so it needs "
                "granularity='channel' (pass it to PolarizedGates, or to "
                "elsa_tf.embed with sparsifier='polarized_gates'). Received: "
                f"granularity={granularity!r}"
            )
        if selection not in SELECTIONS:
            raise ValueError(
                f"PolarizedGates takes selection in {SELECTIONS}; 'lamp' "
                "rescales weight magnitudes per layer, and gates share one "
                f"scale already. Received: selection={selection!r}"
            )
        super().__init__(
            selection,
            update_interval=update_interval,
            granularity=granularity,
            channel_norm=channel_norm,
        )
        self.strength = _check_number("strength", strength, 0.0)
        self.share_strength = _check_number("share_strength", share_strength, 0.0)
        self.initial_value = _check_number(
            "initial_value", initial_value, gates_lib.THRESHOLD, 1.0
        )
        self.gate_learning_rate = _check_number(
            "gate_learning_rate", gate_learning_rate, 0.0, low_open=True
        )

    # -- the level's plan (NumPy, from the channel codes) -------------------

    def gated_groups(self, codes, level: int, sparsity: float) -> list[bool]:
        """Which groups the gates act on in a level of final `sparsity`: those
        that drop a channel (per layer), or all of them if the level drops
        any (global). A level that keeps every channel has no gate."""
        sizes = [c.size for c in codes]
        if self.selection == "global":
            drops = levels.keep_count(sum(sizes), sparsity) < sum(sizes)
            return [drops] * len(codes)
        return [levels.keep_count(n, sparsity) < n for n in sizes]

    def keep_shares(self, codes, level: int, sparsity: float) -> np.ndarray:
        """The share of its free channels each group is to keep at
        `sparsity` (under global selection, the share of all free channels,
        the same in every group)."""
        frozen = [int(np.count_nonzero(c < level)) for c in codes]
        free = [c.size - f for c, f in zip(codes, frozen)]
        if self.selection == "global":
            total = sum(c.size for c in codes)
            want = levels.free_keep_count(total, sum(frozen), sparsity)
            share = min(want / sum(free), 1.0) if sum(free) else 1.0
            return np.full(len(codes), share, np.float32)
        shares = [
            min(levels.free_keep_count(c.size, f, sparsity) / n, 1.0) if n else 1.0
            for c, f, n in zip(codes, frozen, free)
        ]
        return np.asarray(shares, np.float32)

    def channel_order(self, weights, groups) -> np.ndarray:
        """Each channel's rank by `channel_norm` within its group, centred:
        from -0.5 (the smallest) to 0.5 (the largest), groups in order.

        It breaks ties between gates in the share penalty: gates start
        equal, sit equal at 0 or 1, and a level's new channels get almost no
        gradient from the task until the layers reading them grow weights
        for them; without an order, equal gates would move in lockstep and
        cross the threshold together.
        """
        norms = channel_levels.channel_scores(
            [self.score(w) for w in weights], groups, self.channel_norm
        )
        ranks = []
        for n in norms:
            rank = np.argsort(np.argsort(n, kind="stable"), kind="stable")
            ranks.append(rank / max(n.size - 1, 1) - 0.5)
        return np.concatenate(ranks).astype(np.float32)

    # -- training -------------------------------------------------------------

    def gated_forward(self, values, gamma, keep, order, codes, groups, level, sparsity):
        """The weights a training step computes with, and the gates' loss.

        Args:
            values: the prunable weights' values (tensors).
            gamma: all groups' gates, one tensor (groups in order).
            keep: the groups' keep shares now (see `keep_shares`), a tensor.
            order: the channels' `channel_order`, a tensor.
            codes: the groups' channel codes (NumPy), fixed during a level.
            groups: the layout of the unpinned groups.
            level, sparsity: the level and its final sparsity.

        Returns:
            `(values, loss)`: the gated weights, and a scalar loss or None
            when the level has no gate.
        """
        gated = self.gated_groups(codes, level, sparsity)
        if not any(gated):
            return values, None
        offsets = np.cumsum([0] + [c.size for c in codes])
        per_group = [gamma[offsets[i] : offsets[i + 1]] for i in range(len(codes))]
        order_of = [order[offsets[i] : offsets[i + 1]] for i in range(len(codes))]
        free = [c >= level for c in codes]
        forward = [
            gates_lib.straight_through(g) if on else None
            for g, on in zip(per_group, gated)
        ]
        values = gates_lib.gate_weights(values, forward, groups, free)
        terms = []
        for i, (g, o, f, on) in enumerate(zip(per_group, order_of, free, gated)):
            if on and f.any():
                index = np.flatnonzero(f)
                terms.append((tf.gather(g, index), tf.gather(o, index), keep[i]))
        if not terms:
            return values, None
        if self.selection == "global":
            terms = [
                (
                    tf.concat([t[0] for t in terms], 0),
                    tf.concat([t[1] for t in terms], 0),
                    terms[0][2],
                )
            ]
        loss = 0.0
        for free_gamma, free_order, share in terms:
            count = tf.cast(tf.size(free_gamma), free_gamma.dtype)
            term = self.strength * gates_lib.polarization(
                free_gamma, gates_lib.polarization_t(share)
            )
            term += self.share_strength * gates_lib.share_penalty(
                free_gamma, share * count, free_order
            )
            # Nothing pulls while the target keeps every free channel (early
            # in the level's ramp), so the gates stay where they started.
            loss += tf.cast(share < 1.0, term.dtype) * term
        return values, loss

    # -- the level's end ------------------------------------------------------

    def select_channels(
        self, weights, channel_maps, groups, level, sparsity, step, gates=None
    ):
        """The channels with the largest gates (`gates`, one array per
        group), ties broken by `channel_norm`; see `Sparsifier.select_channels`.
        """
        if gates is None:
            raise ValueError(
                "PolarizedGates selects channels by their gates; the model "
                "passes them (gates=...)."
            )
        norms = channel_levels.channel_scores(
            [self.score(w) for w in weights], groups, self.channel_norm
        )
        # One ranking, gates first, then norms: comparable across groups.
        order = np.lexsort((np.concatenate(norms), np.concatenate(gates)))
        ranks = np.empty(order.size, np.float64)
        ranks[order] = np.arange(order.size)
        splits = np.cumsum([g.size for g in gates])[:-1]
        return channel_levels.keep_channels(
            np.split(ranks, splits),
            self.channel_candidates(channel_maps, level, step),
            [levels.frozen_mask_np(m, level) for m in channel_maps],
            sparsity,
            selection=self.selection,
        )

    def undecided(self, gamma, codes, level: int, sparsity: float) -> int:
        """The free gates of the gated groups still undecided."""
        offsets = np.cumsum([0] + [c.size for c in codes])
        return gates_lib.undecided_count(
            [
                np.asarray(gamma)[offsets[i] : offsets[i + 1]][c >= level]
                for i, (c, on) in enumerate(
                    zip(codes, self.gated_groups(codes, level, sparsity))
                )
                if on
            ]
        )

    # -- serialization --------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        del config["block_shape"]  # channels only
        return {
            **config,
            "strength": self.strength,
            "share_strength": self.share_strength,
            "initial_value": self.initial_value,
            "gate_learning_rate": self.gate_learning_rate,
        }
