"""Sparsifiers: which free weights a level keeps, and how it treats the rest.

ELSA works with "essentially any" sparsification method. In elsa_tf a method
is a `Sparsifier`; the *schedule* (how much to keep, and when: the level's
tfmot `PruningSchedule`, built by `LevelSchedule`) is kept apart from it, as
rigl keeps its `MaskUpdater` apart from its schedule. Inside a level, at every
mask update, the sparsifier sees the weights, which of them are frozen (kept
by finished levels: they always count as kept) and which are free, the step
and the target sparsity, and returns the kept set of every weight. The
caller checks that answer (its size, and that no frozen weight is dropped)
rather than trusting it.

A sparsifier also says what the forward pass and the gradients do with the
free weights it does not keep (`feedback`, `forward`), and may add a loss
(`loss`). Selection (per layer or global) and granularity (single weights,
blocks, or whole channels) are options every sparsifier shares
(`elsa_tf.selection`, `elsa_tf.channel_levels`).

Three are built in:

* `GradualMagnitude` (`"gradual_magnitude"`, the default): tfmot's gradual
  magnitude pruning. Pruned weights are set to zero and stay there.
* `DynamicPruningWithFeedback` (`"dpf"`): Lin et al., ICLR 2020. The forward
  and backward passes run on the masked weights, the gradient is applied to
  the dense ones, so pruned weights keep learning and come back when they
  grow.
* `PolarizedGates` (`"polarized_gates"`, channel granularity only, in
  `elsa_tf.polarized_gates`): trained channel gates with a polarization
  regularizer, hardened at the level's end.

A sparsifier of your own is a subclass; overriding `score` is often enough:

    @keras.saving.register_keras_serializable()
    class Random(elsa_tf.Sparsifier):
        def score(self, weight):
            return np.random.default_rng(weight.size).random(weight.shape)
"""

from __future__ import annotations

import importlib
import inspect

import keras
import numpy as np
import tensorflow as tf

from elsa_tf import channel_levels, levels
from elsa_tf import selection as selection_lib

CARRY_OPTIONS = ("zero", "feedback")
# One ranking across all prunable weights, of layer-adaptive (LAMP) scores.
# Plain global ranking led tfmot's separately pruned models at every level on
# a held-out digits CNN, where per-layer ranking trailed them (issue 10); but
# it empties whole layers of a MobileNetV2 (its depthwise kernels and its
# classifier) at 75%, leaving that level at chance. LAMP never empties a
# layer and matched or beat plain global ranking on digits and MNIST-1D (see
# the README's sparsifier benchmark). elsa-train uses it too.
DEFAULT_SELECTION = "lamp"
# Root mean square of a channel's weights: the L2 norm that the channel
# pruning literature ranks filters by (Li et al. 2017 use L1; both are here),
# per element so that groups of different fan-in compare under global ranking.
DEFAULT_CHANNEL_NORM = "l2"


def _check_interval(update_interval):
    if update_interval is None:
        return None
    if (
        isinstance(update_interval, bool)
        or not isinstance(update_interval, (int, np.integer))
        or update_interval < 1
    ):
        raise ValueError(
            "update_interval must be None or an int >= 1 (steps between mask "
            f"updates). Received: update_interval={update_interval!r}"
        )
    return int(update_interval)


@keras.saving.register_keras_serializable(package="elsa_tf")
class Sparsifier:
    """Base class of the sparsification methods a level can use.

    Subclasses override what they change:

    * `score(weight)`: NumPy scores, highest kept (default: magnitude);
    * `candidates(level_map, level)`: which free weights may be kept at a
      mask update (default: the ones still kept in this level, so pruning is
      monotone inside a level, as tfmot's is);
    * `select(...)`: the kept sets themselves, if scoring is not enough;
    * `feedback` (class attribute): False if the weights not kept are set to
      zero and stay there; True if they keep training on the gradient of the
      masked model (`forward` then sees them);
    * `forward(weight, keep)`: the weight a training step computes with;
    * `loss(weights, keeps)`: a loss added to training, or None;
    * `gated` (class attribute): True for a sparsifier whose channels are
      chosen by gates the model holds and trains (`PolarizedGates`, which
      documents the methods the model then calls); False (the default)
      for every other.

    Every option is in `get_config`, so a saved model restores it; register
    a subclass with `keras.saving.register_keras_serializable`.

    Args:
        selection: `"lamp"` (the default: one ranking across all prunable
            weights of layer-adaptive scores, which never empties a layer;
            see `elsa_tf.selection`), `"global"` (one ranking of the scores
            themselves) or `"per_layer"` (every weight tensor reaches the
            level's sparsity, as tfmot's wrappers do).
        block_shape: None selects single weights; a pair of positive ints
            keeps or drops every rank-2 weight in whole blocks of that shape
            (see `elsa_tf.embed`).
        update_interval: steps between mask updates, or None to update when
            the level's tfmot schedule says (its `frequency`).
        granularity: `"weight"` (single weights, or blocks with
            `block_shape`) or `"channel"`: whole channels of the model's
            channel groups, found from its graph (see `elsa_tf.embed`).
        channel_norm: how a channel's weights make its score at channel
            granularity: `"l2"` (root mean square of `score`) or `"l1"`
            (its mean).
    """

    feedback = False
    gated = False

    def __init__(
        self,
        selection=DEFAULT_SELECTION,
        block_shape=None,
        update_interval=None,
        granularity="weight",
        channel_norm=DEFAULT_CHANNEL_NORM,
    ):
        if selection not in selection_lib.SELECTIONS:
            raise ValueError(
                f"selection must be one of {selection_lib.SELECTIONS}. "
                f"Received: selection={selection!r}"
            )
        if granularity not in selection_lib.GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {selection_lib.GRANULARITIES}. "
                f"Received: granularity={granularity!r}"
            )
        if channel_norm not in channel_levels.CHANNEL_NORMS:
            raise ValueError(
                f"channel_norm must be one of {channel_levels.CHANNEL_NORMS}. "
                f"Received: channel_norm={channel_norm!r}"
            )
        self.selection = selection
        self.block_shape = levels.validate_block_shape(block_shape)
        if granularity == "channel" and self.block_shape is not None:
            raise ValueError(
                "block_shape selects blocks of single weights; it does not apply "
                "to granularity='channel', which keeps whole channels. Received: "
                f"block_shape={block_shape!r}, granularity={granularity!r}"
            )
        self.update_interval = _check_interval(update_interval)
        self.granularity = granularity
        self.channel_norm = channel_norm

    # -- which weights ------------------------------------------------------

    def score(self, weight: np.ndarray) -> np.ndarray:
        """Scores of one weight's entries, as NumPy; the highest are kept."""
        return np.abs(weight)

    def candidates(self, level_map: np.ndarray, level: int) -> np.ndarray:
        """The free weights that may be kept at a mask update of `level`."""
        return level_map == level

    def select(
        self, weights, level_maps, level: int, sparsity: float, step: int
    ) -> list[np.ndarray]:
        """The kept set of every weight at a mask update.

        Args:
            weights: the prunable weights' values, NumPy arrays.
            level_maps: their level maps (see `elsa_tf.levels`): entries
                below `level` are frozen, the others free.
            level: the level being trained.
            sparsity: the sparsity to reach now, over all prunable weights.
            step: the step in the level.

        Returns:
            One boolean array per weight, True where kept; frozen weights
            must be kept.
        """
        del step  # magnitude selection does not depend on it
        return selection_lib.keep_sets(
            [self.score(w) for w in weights],
            [self.candidates(m, level) for m in level_maps],
            [levels.frozen_mask_np(m, level) for m in level_maps],
            sparsity,
            selection=self.selection,
            block_shape=self.block_shape,
        )

    def channel_candidates(self, channel_maps, level: int, step) -> list[np.ndarray]:
        """The channels `select_channels` may keep: `candidates` of each
        group's codes, and at the level's end (`step=None`) only those kept
        now, so that the level is trimmed to its target, never re-ranked."""
        candidates = [np.asarray(self.candidates(m, level), bool) for m in channel_maps]
        if step is None:
            candidates = [c & (m == level) for c, m in zip(candidates, channel_maps)]
        return candidates

    def select_channels(
        self, weights, channel_maps, groups, level: int, sparsity: float, step
    ) -> list[np.ndarray]:
        """The kept channels of every unpinned group at a mask update
        (`granularity="channel"`).

        Each channel is scored by the `channel_norm` of `score` over its "out"
        slices, per element (`channel_levels.channel_scores`); the candidates
        are `candidates(channel_map, level)`, only the channels kept now at
        the level's end (`step=None`), as for weights.

        Args:
            weights: the prunable weights' values, NumPy arrays.
            channel_maps: each group's channel codes (entries below `level`
                are frozen).
            groups: the `channel_levels.GroupLayout` of every unpinned group.
            level, sparsity, step: as for `select`; `sparsity` is the share
                of channels removed.

        Returns:
            One boolean array per group, True where kept; frozen channels
            must be kept, and every group keeps at least one.
        """
        scores = channel_levels.channel_scores(
            [self.score(w) for w in weights], groups, self.channel_norm
        )
        candidates = self.channel_candidates(channel_maps, level, step)
        return channel_levels.keep_channels(
            scores,
            candidates,
            [levels.frozen_mask_np(m, level) for m in channel_maps],
            sparsity,
            selection=self.selection,
        )

    # -- what training does with them ---------------------------------------

    def forward(self, weight, keep):
        """The value a training step computes with (a TensorFlow op).

        `keep` is the boolean mask of the weights the level uses (frozen and
        kept). Without feedback the weights not kept are zero already.
        """
        return tf.where(keep, weight, tf.zeros([], weight.dtype))

    def loss(self, weights, keeps):
        """A loss to add to training (a scalar tensor), or None.

        Args:
            weights: the prunable weights as the step computes with them.
            keeps: their masks of used weights (boolean tensors).
        """
        del weights, keeps
        return None

    def end_of_level_values(self, weight: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """What a weight holds when its level is frozen; the next level's
        free weights start from it. Default: the weights not kept are zero,
        so the next level starts out computing what this one computes."""
        return np.where(kept, weight, np.zeros([], weight.dtype))

    # -- serialization -------------------------------------------------------

    def get_config(self) -> dict:
        return {
            "selection": self.selection,
            "block_shape": None if self.block_shape is None else list(self.block_shape),
            "update_interval": self.update_interval,
            "granularity": self.granularity,
            "channel_norm": self.channel_norm,
        }

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.get_config() == self.get_config()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="elsa_tf")
class GradualMagnitude(Sparsifier):
    """Gradual magnitude pruning (Zhu & Gupta 2017), as tfmot does it.

    At each update of the level's schedule, the free weights of smallest
    magnitude are set to zero until the schedule's sparsity is reached; a
    pruned weight stays zero for the rest of the level.
    """


@keras.saving.register_keras_serializable(package="elsa_tf")
class DynamicPruningWithFeedback(Sparsifier):
    """Dynamic Pruning with Feedback (Lin, Stich, Barba, Dmitriev, Jaggi 2020).

    The forward and backward passes run on the masked weights `m * w`, and
    the gradient is applied to the dense free weights `w`: a pruned free
    weight keeps learning (the error `(1 - m) * w` is fed back) and re-enters
    the mask when its magnitude grows back. The mask is recomputed from the
    magnitudes of all free weights every `update_interval` steps, at the
    sparsity the level's tfmot schedule gives for that step. The level ends
    with the last mask it trained with, trimmed to the exact target. Frozen
    weights never change and always count as kept.

    Args:
        update_interval: steps between mask updates (16, the common setting
            of public reimplementations).
        carry: what the weights a finished level does not keep carry into
            the next level, where they are free again: `"zero"` (the next
            level starts out computing exactly what this one computes) or
            `"feedback"` (their fed-back values).
        selection, block_shape, granularity, channel_norm: as for
            `Sparsifier`.
    """

    feedback = True

    def __init__(
        self,
        update_interval=16,
        carry="zero",
        selection=DEFAULT_SELECTION,
        block_shape=None,
        granularity="weight",
        channel_norm=DEFAULT_CHANNEL_NORM,
    ):
        if update_interval is None:
            raise ValueError(
                "DynamicPruningWithFeedback needs an update_interval >= 1. "
                "Received: update_interval=None"
            )
        super().__init__(
            selection, block_shape, update_interval, granularity, channel_norm
        )
        if carry not in CARRY_OPTIONS:
            raise ValueError(
                f"carry must be one of {CARRY_OPTIONS}. Received: carry={carry!r}"
            )
        self.carry = carry

    def candidates(self, level_map, level):
        # Every free weight, pruned ones included: they may come back.
        return level_map >= level

    def select(self, weights, level_maps, level, sparsity, step):
        if step is not None:
            return super().select(weights, level_maps, level, sparsity, step)
        # At the level's end, DPF's output is the mask it last trained with
        # (m_T * w_T): only trimmed to the exact target, never re-ranked with
        # the pruned weights, which would swap in weights the level never
        # computed with (on the digits CNN at 95%: 97% before, 91% after).
        return selection_lib.keep_sets(
            [self.score(w) for w in weights],
            [m == level for m in level_maps],
            [levels.frozen_mask_np(m, level) for m in level_maps],
            sparsity,
            selection=self.selection,
            block_shape=self.block_shape,
        )

    def forward(self, weight, keep):
        # Straight-through: computes with `keep * w`, passes the gradient to
        # all of `w` unchanged (pruned entries included).
        masked = tf.where(keep, weight, tf.zeros([], weight.dtype))
        return weight + tf.stop_gradient(masked - weight)

    def end_of_level_values(self, weight, kept):
        if self.carry == "feedback":
            return weight
        return super().end_of_level_values(weight, kept)

    def get_config(self):
        return {**super().get_config(), "carry": self.carry}


_NAMES = {
    "gradual_magnitude": GradualMagnitude,
    "dpf": DynamicPruningWithFeedback,
    # Defined in its own module, which imports this one: loaded when named.
    "polarized_gates": "elsa_tf.polarized_gates.PolarizedGates",
}
NAMES = tuple(_NAMES)


def _named(name: str):
    """The sparsifier class registered under `name`, or None."""
    cls = _NAMES.get(name)
    if isinstance(cls, str):
        module, _, attribute = cls.rpartition(".")
        cls = getattr(importlib.import_module(module), attribute)
    return cls


def get(identifier, **options) -> Sparsifier:
    """Resolves what a user passes as `sparsifier` to a `Sparsifier`.

    Args:
        identifier: a `Sparsifier`, one of `NAMES`, a config dict (as
            `keras.saving.serialize_keras_object` writes it), or None for
            the default, `"gradual_magnitude"`.
        **options: constructor options for a sparsifier given by name
            (`selection`, `block_shape`, `update_interval`, ...).

    Raises:
        ValueError: for an unknown name, or options the sparsifier does not
            take, or options given with a sparsifier object.
        TypeError: for anything else.
    """
    if identifier is None:
        identifier = "gradual_magnitude"
    if isinstance(identifier, Sparsifier):
        if options:
            raise ValueError(
                f"Options {sorted(options)} are set on a sparsifier object "
                f"itself, not beside it. Received: sparsifier={identifier!r}, "
                f"options={options}"
            )
        return identifier
    if isinstance(identifier, dict):
        sparsifier = keras.saving.deserialize_keras_object(identifier)
        if not isinstance(sparsifier, Sparsifier):
            raise TypeError(
                f"The config does not describe a Sparsifier. Received: {identifier!r}"
            )
        return get(sparsifier, **options)
    if isinstance(identifier, str):
        cls = _named(identifier)
        if cls is None:
            raise ValueError(
                f"Unknown sparsifier {identifier!r}; use one of {NAMES} or a "
                f"Sparsifier instance. Received: sparsifier={identifier!r}"
            )
        accepted = inspect.signature(cls).parameters
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(
                f"Sparsifier {identifier!r} does not take options {unknown}; it "
                f"takes {sorted(accepted)}. Received: {options}"
            )
        return cls(**options)
    raise TypeError(
        "sparsifier must be a Sparsifier, one of "
        f"{NAMES}, or None. Received: sparsifier={identifier!r}"
    )


def check_kept(kept, level_maps, level: int, sparsity: float, sparsifier) -> list:
    """Checks a sparsifier's answer; returns the kept sets as bool arrays.

    Raises:
        ValueError: for a kept set of the wrong shape, one that drops a
            frozen weight, or kept sets whose total is not the level's
            budget.
    """
    name = type(sparsifier).__name__
    out = selection_lib.checked_sets(
        kept, level_maps, level, f"{name}.select", "weight"
    )
    sizes = [m.size for m in level_maps]
    frozen = [levels.frozen_mask_np(m, level) for m in level_maps]
    candidate_counts = [
        int(np.count_nonzero(np.asarray(sparsifier.candidates(m, level)) & ~f))
        for m, f in zip(level_maps, frozen)
    ]
    want = selection_lib.expected_kept(
        sizes,
        [int(f.sum()) for f in frozen],
        candidate_counts,
        sparsity,
        selection=sparsifier.selection,
    )
    tolerance = selection_lib.count_tolerance(
        [m.shape for m in level_maps],
        sparsifier.block_shape,
        selection=sparsifier.selection,
    )
    got = sum(int(k.sum()) for k in out)
    if abs(got - want) > tolerance:
        raise ValueError(
            f"{name}.select kept {got} weights; a level of sparsity {sparsity} "
            f"with {sparsifier.selection} selection keeps {want}"
            + (f" (within {tolerance})" if tolerance else "")
            + "."
        )
    return out
