"""`ElsaWrapper`: the Keras plumbing that puts nested levels into one layer.

The wrapper owns, for each prunable weight of the layer it wraps, a `uint8`
level map (see `elsa_tf.levels`), and a pair of integers: the level being
trained (`current_level`, also the number of finished levels) and the level
the layer computes with (`view_level`). At inference, the wrapped layer runs
inside a `keras.StatelessScope` that maps each prunable weight to its masked
value, so any layer (a `MultiHeadAttention` made of `EinsumDense`s, a user's
own block) is masked without re-implementing its math.

While `LevelScheduler` trains (as in `elsa_tf.fit`), no mask is applied in
the forward pass: the weights a level does not use are kept at exactly zero in
the variables themselves (pruning zeroes them and `FreezingOptimizer` projects
every update back), so the raw weights *are* the current level's weights, and
a training step costs what the plain model's does plus one projection in the
optimizer. Training always runs at the level being trained. Outside the
scheduler, training masks like inference does, whatever the optimizer.

Shared weights (everything not prunable: biases, normalization parameters and
statistics, excluded kernels) are kept as the `shared` option says:

* `"freeze"`: trained with level 0, frozen afterwards. A frozen layer with no
  prunable weights (a `BatchNormalization`, say) is then called with
  `training=False`, so normalization runs in inference mode, as Keras does for
  a frozen layer when fine-tuning.
* `"per_level"`: every level trains its own copy, starting from the previous
  level's. Finished levels' copies are kept in a bank of `K - 1` entries.
"""

from __future__ import annotations

import inspect
import weakref

import keras
import numpy as np
import tensorflow as tf

from elsa_tf import levels, schedules
from elsa_tf import prunable as prunable_lib

SHARED_MODES = ("freeze", "per_level")
SELECTIONS = ("per_layer", "global")


def check_option(name: str, value, allowed: tuple) -> None:
    """Raises a ValueError naming `name` unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}. Received: {name}={value!r}")


# id(variable) -> (weak wrapper, index into its level maps, or None for a
# shared weight). The optimizer wrapper only sees variables, so it looks up
# here how each one may change.
_OWNERS: dict[int, tuple[weakref.ref, int | None]] = {}

FROZEN = "frozen"


class Projection:
    """Maps an optimizer's update of a prunable weight back onto the level.

    `project(old, new)` keeps frozen entries at `old`, the current level's
    entries at `new`, and every other entry at zero. `old` is only needed once
    some level is finished (`needs_old`).
    """

    def __init__(self, level_map, level: int):
        self.level_map = level_map
        self.level = level
        self.needs_old = level > 0

    def __call__(self, old, new):
        return levels.project_update(old, new, self.level_map.value, self.level)


def training_constraint(variable):
    """How an optimizer step may change `variable`.

    Returns:
        None to update it freely (not elsa_tf's, or not frozen), `FROZEN` to
        leave it untouched (a shared weight after level 0 under
        `shared="freeze"`), or a `Projection` for a prunable weight. The
        answer is fixed when a train step is traced; `LevelScheduler` and
        `elsa_tf.fit` retrace after every level.
    """
    entry = _OWNERS.get(id(variable))
    wrapper = entry[0]() if entry else None
    if wrapper is None:
        return None
    index = entry[1]
    if index is None:
        return FROZEN if wrapper._shared_frozen else None
    return Projection(wrapper.level_maps[index], wrapper._traced_level)


def _register(variable, wrapper, index):
    key = id(variable)
    _OWNERS[key] = (weakref.ref(wrapper), index)
    weakref.finalize(variable, _OWNERS.pop, key, None)


@keras.saving.register_keras_serializable(package="elsa_tf")
class ElsaWrapper(keras.layers.Wrapper):
    """Holds nested sparse levels of one layer's weights.

    Made by `elsa_tf.embed`; users rarely build it by hand.

    Args:
        layer: the Keras layer to wrap, already built.
        sparsities: target sparsity of each level, strictly decreasing.
        prune: whether the layer's prunable weights are pruned. If False, all
            of its weights are shared weights.
        shared: how shared weights are kept, `"freeze"` or `"per_level"`.
        schedule: the `LevelSchedule` (or its identifier) used inside a level.
        selection: `"per_layer"` or `"global"` magnitude selection.
        block_shape: None to select single weights, or a pair of positive
            ints: rank-2 prunable weights are then kept or dropped in whole
            blocks of that shape (see `elsa_tf.embed`).
        **kwargs: base `Layer` arguments such as `name`.
    """

    def __init__(
        self,
        layer,
        sparsities,
        prune: bool = True,
        shared: str = "freeze",
        schedule=None,
        selection: str = "per_layer",
        block_shape: tuple[int, int] | None = None,
        **kwargs,
    ):
        super().__init__(layer, **kwargs)
        self.sparsities = levels.validate_sparsities(sparsities)
        check_option("shared", shared, SHARED_MODES)
        check_option("selection", selection, SELECTIONS)
        self.prune = bool(prune)
        self.shared = shared
        self.schedule = schedules.get(schedule)
        self.selection = selection
        self.block_shape = levels.validate_block_shape(block_shape)
        self.supports_masking = getattr(layer, "supports_masking", False)
        self._call_has_training = "training" in inspect.signature(layer.call).parameters
        self._state_created = False
        if layer.built:
            self._create_state()

    @property
    def num_levels(self) -> int:
        return len(self.sparsities)

    # -- state ---------------------------------------------------------------

    @property
    def prunable_weights(self) -> list:
        """The wrapped layer's weights that are pruned."""
        if not self.prune:
            return []
        return prunable_lib.get_prunable_weights(self.layer)

    @property
    def shared_weights(self) -> list:
        """The wrapped layer's other weights (see the module docstring)."""
        pruned = {id(w) for w in self.prunable_weights}
        return [w for w in self.layer.weights if id(w) not in pruned]

    def _create_state(self):
        if self._state_created:
            return
        self.level_maps = []
        for i, w in enumerate(self.prunable_weights):
            self.level_maps.append(
                self.add_weight(
                    shape=w.shape,
                    initializer="zeros",
                    dtype="uint8",
                    trainable=False,
                    name=f"level_map_{i}_{w.name}",
                )
            )
            _register(w, self, i)
        # [current level, view level] in one variable: one entry less per
        # layer in the saved file.
        self.level_state = self.add_weight(
            shape=(2,),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            name="level_state",
        )
        self.banks = []
        for w in self.shared_weights:
            _register(w, self, None)
        if self.shared == "per_level" and self.num_levels > 1:
            for i, w in enumerate(self.shared_weights):
                self.banks.append(
                    self.add_weight(
                        shape=(self.num_levels - 1, *w.shape),
                        initializer="zeros",
                        dtype=w.dtype,
                        trainable=False,
                        name=f"bank_{i}_{w.name}",
                    )
                )
        self._shared_frozen = False
        self._traced_level = 0
        self._train_raw = False  # set by LevelScheduler while it trains
        self._state_created = True
        self.built = True

    def build(self, *args, **kwargs):
        # The wrapped layer is built before wrapping (or by build_from_config).
        self._create_state()

    def get_build_config(self):
        return {"layer": self.layer.get_build_config()}

    def build_from_config(self, config):
        if not self.layer.built:
            self.layer.build_from_config(config["layer"])
        self._create_state()

    def load_own_variables(self, store):
        super().load_own_variables(store)
        self.sync_level_state()

    @property
    def current_level(self) -> int:
        """The level being trained; equals the number of finished levels."""
        return int(self.level_state.numpy()[0])

    @property
    def view_level(self) -> int:
        """The level the layer computes with at inference."""
        return int(self.level_state.numpy()[1])

    def set_view_level(self, level: int) -> None:
        self.level_state.assign([self.current_level, level])

    def sync_level_state(self):
        """Re-reads the level from the variables into what tracing uses.

        How the optimizer treats each weight is decided when a step is
        traced, so callers retrace after a level change (`LevelScheduler`
        does).
        """
        self._traced_level = self.current_level
        self._shared_frozen = self.shared == "freeze" and self._traced_level >= 1

    # -- forward -------------------------------------------------------------

    def _shared_value(self, index, view):
        """Graph value of shared weight `index` at level `view` (per_level)."""
        bank = self.banks[index]
        working = self.shared_weights[index].value
        current = self.level_state.value[0]
        use_working = view >= tf.minimum(current, self.num_levels - 1)
        slot = tf.clip_by_value(view, 0, self.num_levels - 2)
        return use_working, tf.where(use_working, working, tf.gather(bank.value, slot))

    def call(self, *args, training=None, **kwargs):
        if self._call_has_training:
            frozen_whole = self._shared_frozen and not self.prunable_weights
            kwargs["training"] = False if frozen_whole else training
        mapping, bank_values = [], {}
        # Under LevelScheduler (whose FreezingOptimizer keeps unused weights at
        # zero), training runs on the variables as they are: they hold the
        # current level exactly. Anything else computes at the view level.
        at_view = not (training is True and self._train_raw)
        view = self.level_state.value[1]
        if at_view:
            mapping = [
                (w, levels.masked_weight(w.value, m.value, view))
                for w, m in zip(self.prunable_weights, self.level_maps)
            ]
        for i, w in enumerate(self.shared_weights if self.banks and at_view else []):
            use_working, value = self._shared_value(i, view)
            mapping.append((w, value))
            bank_values[id(w)] = (use_working, value)
        with keras.StatelessScope(state_mapping=mapping) as scope:
            outputs = self.layer(*args, **kwargs)
        # Carry out the state updates the layer made (normalization
        # statistics, seed generators), except into frozen weights.
        prunable_ids = {id(w) for w in self.prunable_weights}
        shared_ids = {id(w) for w in self.shared_weights}
        for v in self.layer.variables:
            if id(v) in prunable_ids:
                continue
            new = scope.get_current_value(v)
            if new is None:
                continue
            if id(v) in bank_values:
                use_working, mapped = bank_values[id(v)]
                if new is not mapped:
                    v.assign(tf.where(use_working, new, v.value))
            elif not (self._shared_frozen and id(v) in shared_ids):
                v.assign(new)
        return outputs

    def compute_output_spec(self, *args, **kwargs):
        return self.layer.compute_output_spec(*args, **kwargs)

    def compute_mask(self, inputs, previous_mask=None):
        return self.layer.compute_mask(inputs, previous_mask)

    # -- level transitions (eager) ---------------------------------------------

    def effective_weights(self, level: int) -> list[np.ndarray]:
        """The wrapped layer's weights at `level`, in `layer.weights` order."""
        values = {}
        for w, m in zip(self.prunable_weights, self.level_maps):
            values[id(w)] = levels.masked_weight(w.value, m.value, level).numpy()
        for i, w in enumerate(self.shared_weights):
            if self.banks:
                values[id(w)] = self._shared_value(i, tf.constant(level, tf.int32))[
                    1
                ].numpy()
            else:
                # Not np.array(w.value): NumPy cannot convert a scalar
                # MirroredVariable inside a tf.distribute strategy's scope.
                values[id(w)] = w.numpy()
        return [values[id(w)] for w in self.layer.weights]

    def finish_level(self):
        """Freezes the current level and opens the next one."""
        k = self.current_level
        if k >= self.num_levels:
            raise ValueError(
                f"All {self.num_levels} levels of {self.name!r} are finished."
            )
        for i, w in enumerate(self.shared_weights if self.banks else []):
            if k < self.num_levels - 1:
                bank = self.banks[i]
                bank.assign(tf.tensor_scatter_nd_update(bank.value, [[k]], [w.value]))
        for w, m in zip(self.prunable_weights, self.level_maps):
            # Pruned free weights restart from zero, so level k+1 starts out
            # computing exactly what level k computes.
            w.assign(levels.masked_weight(w.value, m.value, k))
            if k + 1 < self.num_levels:
                m.assign(levels.open_map(m.numpy(), k + 1))
        self.level_state.assign([k + 1, min(k + 1, self.num_levels - 1)])
        self.sync_level_state()

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "sparsities": list(self.sparsities),
                "prune": self.prune,
                "shared": self.shared,
                "schedule": self.schedule.get_config(),
                "selection": self.selection,
                "block_shape": None
                if self.block_shape is None
                else list(self.block_shape),
            }
        )
        return config
