"""`ElsaModel`: the one model-level owner of ELSA's state, around any model.

`elsa_tf.embed` returns an `ElsaModel` holding a copy of the user's model
(`inner_model`: Sequential, Functional, subclassed, keras_hub, its class
kept) and, for each prunable weight found anywhere inside it, a `uint8`
level map (see `elsa_tf.levels`), plus two integers: the level being trained
(`current_level`, also the number of finished levels) and the level the model
computes with (`view_level`). The level plan (sparsities, schedule, and the
`Sparsifier` with its selection and granularity) and the training rule of
every variable (`variable_rule`) are held here once, not copied into layers.

At inference, the inner model runs inside a `keras.StatelessScope` that maps
each prunable weight to its masked value, so any layer (a keras_hub
`TransformerEncoder`, a user's own block, a subclassed model's `call`) is
masked without re-implementing its math or re-wiring the model.

While `LevelScheduler` trains (as in `elsa_tf.fit`), no mask is applied in
the forward pass: the weights a level does not use are kept at exactly zero in
the variables themselves (pruning zeroes them and `FreezingOptimizer` projects
every update back), so the raw weights *are* the current level's weights, and
a training step costs what the plain model's does plus one projection in the
optimizer. A sparsifier with feedback (`DynamicPruningWithFeedback`) keeps
training its pruned weights instead, so its steps compute with the weights
its `forward` gives (the masked weights, with a straight-through gradient).
A gated sparsifier (`PolarizedGates`) multiplies each free channel by its
binary gate instead; the gates are this model's own variables, never the
inner model's, so inference, extraction and export see none.
Outside the scheduler, training masks like inference does.

Shared weights (everything not prunable: biases, normalization parameters and
statistics, excluded kernels) are kept as the `shared` option says:

* `"freeze"`: trained with level 0, frozen afterwards. A layer holding only
  shared weights (a `BatchNormalization`, say) then runs as a non-trainable
  layer, so normalization runs in inference mode, as Keras does for a frozen
  layer when fine-tuning.
* `"per_level"`: every level trains its own copy, starting from the previous
  level's. Finished levels' copies are kept in a bank of `K - 1` entries.
* `"per_level_statistics"`: as `"freeze"` for trained weights, but the
  statistics a model updates itself (every non-trainable floating-point
  shared variable: BatchNormalization's moving mean and variance) are kept
  per level, as `"per_level"` keeps them. Normalization runs in training mode
  at every level, so each level's network is normalized by its own batch
  statistics, and at inference by its own moving ones. Under `"freeze"`, a
  channel that level 0 left dead has a moving variance near zero, which
  multiplies that channel by about `1/sqrt(epsilon)` once later levels give
  it weights.
"""

from __future__ import annotations

import inspect
import warnings

import keras
import numpy as np
import tensorflow as tf

from elsa_tf import (
    _keras_compat,
    channel_levels,
    compiled_functions,
    constraints,
    levels,
    schedules,
)
from elsa_tf import channels as channels_lib
from elsa_tf import prunable as prunable_lib
from elsa_tf import selection as selection_lib
from elsa_tf import sparsifiers as sparsifiers_lib

SHARED_MODES = ("freeze", "per_level", "per_level_statistics")


def default_shared(granularity: str) -> str:
    """The `shared` mode a model gets when none is given.

    `"freeze"` for single weights. `"per_level_statistics"` for whole
    channels: a channel a level drops outputs a constant, so its frozen
    normalization statistics would keep a variance near zero, and once a
    later level gives it weights its output would be multiplied by about
    `1 / sqrt(epsilon)` (on the digits CNN, magnitude channel levels fell to
    63% and 61% under `"freeze"`, against 97% and 98% with per-level
    statistics).
    """
    return "per_level_statistics" if granularity == "channel" else "freeze"


SELECTIONS = selection_lib.SELECTIONS
GRANULARITIES = selection_lib.GRANULARITIES

UNSCHEDULED_TRAINING = (
    "An embedded model is being trained without elsa_tf.LevelScheduler: "
    "no level is pruned or frozen by this training, and a plain optimizer "
    "also changes the weights of finished levels. Train with elsa_tf.fit(...), "
    "or compile with elsa_tf.FreezingOptimizer(...) and pass "
    "callbacks=[elsa_tf.LevelScheduler(epochs_per_level=...)] to model.fit."
)


def check_option(name: str, value, allowed: tuple) -> None:
    """Raises a ValueError naming `name` unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}. Received: {name}={value!r}")


def _set_untracked(obj, name, value):
    # Keras tracks the variables in any list a layer holds as its own (they
    # would be saved twice): caches of the inner model's variables are not.
    object.__setattr__(obj, name, value)


def _shared_only_layers(model, prunable_ids) -> list:
    """Leaf layers with weights, none prunable, whose call takes `training`."""
    return [
        layer
        for layer in _keras_compat.walk(model)
        if layer.weights
        and not _keras_compat.sublayers(layer)
        and not any(id(w) in prunable_ids for w in layer.weights)
        and "training" in inspect.signature(layer.call).parameters
    ]


def _serialize_uncompiled(model) -> dict:
    # The inner model is never compiled for training (the ElsaModel is); a
    # keras_hub task compiles itself when made, and reloading that compile
    # config would only warn.
    config = keras.saving.serialize_keras_object(model)
    config.pop("compile_config", None)
    return config


_BASE_LOSS = sparsifiers_lib.Sparsifier.loss


def _banked(shared: str, weight) -> bool:
    """Whether a shared weight keeps a copy per level under `shared`."""
    if shared == "per_level":
        return True
    # Statistics the model updates itself, not the optimizer.
    return (
        shared == "per_level_statistics"
        and not weight.trainable
        and keras.backend.is_float_dtype(weight.dtype)
    )


def _initializer(layer, variable):
    """The initializer `layer` made `variable` with, or None if not found.

    By the layer's `<name>_initializer` attribute, as the Keras layers that
    channel groups follow name them: `kernel_initializer`, a separable
    convolution's `pointwise_initializer` for its `pointwise_kernel`, and
    `depthwise_initializer` for a depthwise kernel.
    """
    stem = variable.name.removesuffix("_kernel")
    for prefix in (variable.name, stem, "depthwise"):
        initializer = getattr(layer, f"{prefix}_initializer", None)
        if callable(initializer):
            return initializer
    return None


def _fresh_values(initializer, weight, seed: tuple[int, int]) -> np.ndarray:
    """`initializer`'s values for `weight`, seeded by `seed` (the level it
    opens, the weight's index) where the initializer is random, so that the
    same model gives the same values on one device or on several replicas."""
    config = initializer.get_config()
    if "seed" in config:
        level, index = seed
        config["seed"] = 1_000_003 * level + index
        initializer = type(initializer).from_config(config)
    return keras.ops.convert_to_numpy(initializer(weight.shape, weight.dtype))


def _unit_initializers(owners, model, shared: str) -> dict:
    """`id(kernel)` -> its layer's kernel initializer, for the prunable
    kernels whose last axis is a unit (Dense, Conv1D/2D/3D) that may start
    afresh when a level leaves it unused (`ElsaModel._start_unused_units`).

    Under `shared="freeze"`, a unit that a BatchNormalization normalizes is
    left out: that normalization's statistics froze with level 0, where the
    unit computed a constant (variance near zero), so fresh weights would be
    multiplied by about `1 / sqrt(epsilon)`. Which units are normalized is
    read from the model's channel graph; where there is none (a subclassed
    model), no unit starts afresh under `"freeze"`.
    """
    normalized = set()
    if shared == "freeze":
        try:
            groups = channels_lib.channel_groups(model)
        except ValueError:
            return {}
        statistics = {
            w.path
            for layer in _keras_compat.walk(model)
            if isinstance(layer, keras.layers.BatchNormalization)
            for w in layer.weights
        }
        for group in groups:
            paths = {m.path for m in group.members}
            if paths & statistics:
                normalized.update(m.path for m in group.members if m.role == "out")
    found = {}
    for _, chain, weights in owners:
        layer = chain[-1]
        if type(layer) not in channels_lib.PRODUCERS:
            continue
        for w in weights:
            if w is getattr(layer, "kernel", None) and w.path not in normalized:
                initializer = _initializer(layer, w)
                if initializer is not None:
                    found[id(w)] = initializer
    return found


@keras.saving.register_keras_serializable(package="elsa_tf")
class ElsaModel(keras.Model):
    """Nested sparse levels of one model's weights, and their training plan.

    Made by `elsa_tf.embed`; users rarely build it by hand. It computes what
    `inner_model` computes, at `view_level`.

    Args:
        inner_model: the built Keras model to hold (elsa_tf's own copy).
        sparsities: target sparsity of each level, strictly decreasing.
        prune: None to prune every prunable weight inside `inner_model`, or
            the indices, in `elsa_tf.prunable.prunable_owners(inner_model)`
            order, of the layers whose weights to prune. Indices, not names:
            Keras renames unnamed sublayers in every copy and every load.
        shared: how shared weights are kept: `"freeze"`, `"per_level"` or
            `"per_level_statistics"` (see the module's docstring); None for
            `default_shared(granularity)`.
        schedule: the `LevelSchedule` (or its identifier) used inside a level.
        sparsifier: the `Sparsifier` (or its name) that picks the kept
            weights; None for `"gradual_magnitude"`.
        selection, block_shape, granularity: options for a sparsifier given
            by name (or None): `"lamp"`, `"global"` or `"per_layer"` selection, None or
            the block shape of rank-2 weights, and `"weight"` or `"channel"`
            (see `elsa_tf.embed`). Files saved
            by elsa_tf 0.2.0 hold these instead of a sparsifier.
        keep_whole: at channel granularity, names of layers of `inner_model`
            whose output width every level keeps (`elsa_tf.channels`); None
            for none but the model's outputs.
        **kwargs: base `Model` arguments such as `name`.
    """

    def __init__(
        self,
        inner_model,
        sparsities,
        prune=None,
        shared: str | None = None,
        schedule=None,
        sparsifier=None,
        selection: str | None = None,
        block_shape: tuple[int, int] | None = None,
        granularity: str | None = None,
        keep_whole=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(inner_model, keras.Model):
            raise TypeError(
                f"inner_model must be a keras.Model. Received: {inner_model!r}"
            )
        self.sparsities = levels.validate_sparsities(sparsities)
        if shared is not None:
            check_option("shared", shared, SHARED_MODES)
        if prune is not None:
            prune = list(prune) if not isinstance(prune, (str, bytes)) else prune
            if (
                not isinstance(prune, list)
                or not prune
                or not all(
                    isinstance(p, (int, np.integer)) and not isinstance(p, bool)
                    for p in prune
                )
            ):
                raise TypeError(
                    "prune must be None or a non-empty list of owner indices "
                    f"(elsa_tf.prunable.prunable_owners). Received: prune={prune!r}"
                )
            prune = sorted({int(p) for p in prune})
        self.prune = prune
        self.schedule = schedules.get(schedule)
        options = {"selection": selection} if selection is not None else {}
        if block_shape is not None:
            options["block_shape"] = block_shape
        if granularity is not None:
            options["granularity"] = granularity
        self.sparsifier = sparsifiers_lib.get(sparsifier, **options)
        if shared is None:
            shared = default_shared(self.granularity)
        self.shared = shared
        if self.granularity == "channel" and self.prune is not None:
            raise ValueError(
                "prune does not apply to granularity='channel', whose prunable "
                "weights are the members of the model's unpinned channel groups. "
                f"Received: prune={self.prune!r}"
            )
        if keep_whole is not None:
            keep_whole = channels_lib.check_keep_whole(keep_whole)
            if self.granularity != "channel":
                raise ValueError(
                    "keep_whole applies to granularity='channel' only. "
                    f"Received: keep_whole={keep_whole!r}, "
                    f"granularity={self.granularity!r}"
                )
        self.keep_whole = keep_whole
        self.inner_model = inner_model
        self._inner_takes_training = (
            "training" in inspect.signature(inner_model.call).parameters
        )
        self._state_created = False
        if inner_model.built:
            self._create_state()

    @property
    def num_levels(self) -> int:
        return len(self.sparsities)

    @property
    def selection(self) -> str:
        """The sparsifier's selection: `"lamp"`, `"global"` or `"per_layer"`."""
        return self.sparsifier.selection

    @property
    def block_shape(self) -> tuple[int, int] | None:
        """The sparsifier's block shape, or None for single weights."""
        return self.sparsifier.block_shape

    @property
    def granularity(self) -> str:
        """The sparsifier's granularity, `"weight"` or `"channel"`."""
        return self.sparsifier.granularity

    # -- state ---------------------------------------------------------------

    def _create_state(self):
        if self._state_created:
            return
        # The unpinned channel groups' layout over the prunable weights, at
        # channel granularity; None at weight granularity.
        _set_untracked(self, "channel_layout", None)
        if self.granularity == "channel":
            owners = self._channel_owners()
        else:
            owners = prunable_lib.prunable_owners(self.inner_model)
            _set_untracked(
                self,
                "_initializers",
                _unit_initializers(owners, self.inner_model, self.shared),
            )
        if self.prune is not None:
            unknown = [i for i in self.prune if not 0 <= i < len(owners)]
            if unknown:
                raise ValueError(
                    f"prune names owner indices {unknown}, but the model has "
                    f"{len(owners)} layers with prunable weights. Received: "
                    f"prune={list(self.prune)}"
                )
            owners = [owners[i] for i in self.prune]
        prunable = [(path, w) for path, _, weights in owners for w in weights]
        _set_untracked(self, "prunable_weights", [w for _, w in prunable])
        _set_untracked(self, "weight_owners", [path for path, _ in prunable])
        ids = {id(w) for w in self.prunable_weights}
        _set_untracked(
            self,
            "shared_weights",
            [w for w in self.inner_model.weights if id(w) not in ids],
        )
        _set_untracked(self, "_shared_only", _shared_only_layers(self.inner_model, ids))
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
            constraints.register(w, self, i)
        # [current level, view level] in one variable.
        self.level_state = self.add_weight(
            shape=(2,),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            name="level_state",
        )
        for w in self.shared_weights:
            constraints.register(w, self, None)
        self.banks = []
        # Per shared weight, its position in `banks`, or None (one copy).
        _set_untracked(self, "_bank_of", [None] * len(self.shared_weights))
        for i, w in enumerate(self.shared_weights):
            if self.num_levels > 1 and _banked(self.shared, w):
                self._bank_of[i] = len(self.banks)
                self.banks.append(
                    self.add_weight(
                        shape=(self.num_levels - 1, *w.shape),
                        initializer="zeros",
                        dtype=w.dtype,
                        trainable=False,
                        name=f"bank_{i}_{w.name}",
                    )
                )
        # Free weights a mask update brought back after an earlier one of the
        # same level pruned them, per level (summary's `reactivations`).
        self.reactivations = self.add_weight(
            shape=(self.num_levels,),
            initializer="zeros",
            dtype="int64",
            trainable=False,
            name="reactivations",
        )
        if self.granularity == "channel":
            _set_untracked(
                self,
                "channel_layout",
                channel_levels.layout(
                    self.channel_groups, [w.path for w in self.prunable_weights]
                ),
            )
            channel_levels.check_targets(
                self.channel_layout, self.sparsities, self.selection
            )
        if self.sparsifier.gated:
            self._create_gates()
        self.shared_frozen = False
        self.traced_level = 0
        self.train_raw = False  # set by LevelScheduler while it trains
        self._state_created = True
        self.built = True

    def _create_gates(self):
        """The state of a gated sparsifier (`PolarizedGates`): one gate per
        channel of every unpinned group, in group order (`gates`, trained and
        clamped, never part of the inner model); each group's keep share now
        (`gate_keep`) and the channels' order by weight norm (`gate_order`,
        which breaks ties between gates), both set by the mask updates; and,
        per level, how many gates were undecided when it was hardened
        (`undecided_gates`, -1 until then)."""
        if self.channel_layout is None:
            raise ValueError(
                f"{type(self.sparsifier).__name__} is gated: it needs "
                "granularity='channel'."
            )
        self.gates = self.add_weight(
            shape=(sum(g.size for g in self.channel_layout),),
            initializer=keras.initializers.Constant(self.sparsifier.initial_value),
            dtype="float32",
            trainable=True,
            name="channel_gates",
        )
        self.gate_order = self.add_weight(
            shape=self.gates.shape,
            initializer="zeros",
            dtype="float32",
            trainable=False,
            name="gate_order",
        )
        self.gate_order.assign(
            self.sparsifier.channel_order(
                [w.numpy() for w in self.prunable_weights], self.channel_layout
            )
        )
        constraints.register(self.gates, self, constraints.GATE)
        self.gate_keep = self.add_weight(
            shape=(len(self.channel_layout),),
            initializer="ones",
            dtype="float32",
            trainable=False,
            name="gate_keep",
        )
        self.undecided_gates = self.add_weight(
            shape=(self.num_levels,),
            initializer=keras.initializers.Constant(-1),
            dtype="int64",
            trainable=False,
            name="undecided_gates",
        )

    def gated_level(self) -> bool:
        """Whether the gates act at the level being trained (eager)."""
        k = self.traced_level
        if not self.sparsifier.gated or k >= self.num_levels:
            return False
        with tf.init_scope():
            codes = self.channel_codes()
        return any(self.sparsifier.gated_groups(codes, k, self.sparsities[k]))

    def channel_codes(self) -> list[np.ndarray]:
        """Each unpinned group's channel codes, from the level maps (eager)."""
        return channel_levels.channel_codes(
            [m.numpy() for m in self.level_maps], self.channel_layout
        )

    def _channel_owners(self) -> list[tuple[str, list, list]]:
        """Owners of the prunable weights at channel granularity.

        As `prunable.prunable_owners` lists them: (layer path, chain, weights).
        The prunable weights are the trainable variables that are members of
        unpinned channel groups; BatchNormalization's moving statistics stay
        shared weights.
        """
        try:
            groups = channels_lib.channel_groups(
                self.inner_model, keep_whole=self.keep_whole or ()
            )
        except ValueError as e:
            raise ValueError(
                f"granularity='channel' cannot be used on model "
                f"{self.inner_model.name!r}: {e}"
            ) from e
        _set_untracked(self, "channel_groups", groups)
        members = {m.path for g in groups if g.pinned is None for m in g.members}
        # A sublayer (an attention layer's "query") is named by its path.
        paths: dict[int, str] = {}

        def name(layer, path):
            paths.setdefault(id(layer), path)
            for sub in _keras_compat.sublayers(layer):
                name(sub, f"{path}/{sub.name}")

        for layer in self.inner_model.layers:
            name(layer, layer.name)
        owners, initializers = {}, {}
        for layer in _keras_compat.walk(self.inner_model):
            for w in layer.weights:
                if (
                    w.trainable
                    and w.path in members
                    and not _keras_compat.sublayers(layer)
                ):
                    path = paths.get(id(layer), layer.name)
                    owners.setdefault(id(layer), (path, layer, []))[2].append(w)
                    initializers[id(w)] = _initializer(layer, w)
        _set_untracked(self, "_initializers", initializers)
        return [(path, [layer], weights) for path, layer, weights in owners.values()]

    def build(self, *args, **kwargs):
        # The inner model is built before embedding (or when it is loaded).
        self._create_state()

    def load_own_variables(self, store):
        own = self._trainable_variables + self._non_trainable_variables
        if len(store.keys()) == len(own) - 1 and own[-1] is self.reactivations:
            # A file of elsa_tf 0.2.0: no reactivation counts (the last).
            for i, v in enumerate(own[:-1]):
                v.assign(store[str(i)])
            self.reactivations.assign(np.zeros(self.num_levels, np.int64))
        else:
            super().load_own_variables(store)
        self.sync_level_state()

    @property
    def current_level(self) -> int:
        """The level being trained; equals the number of finished levels."""
        return int(self.level_state.numpy()[0])

    @property
    def view_level(self) -> int:
        """The level the model computes with at inference."""
        return int(self.level_state.numpy()[1])

    def set_view_level(self, level: int) -> None:
        self.level_state.assign([self.current_level, level])

    def sync_level_state(self):
        """Re-reads the level from the variables into what tracing uses.

        How the optimizer treats each weight is decided when a step is
        traced, for `trace_key()`; callers put the functions traced for the
        new key in place after a level change (`LevelScheduler` does, with
        `elsa_tf.compiled_functions`).
        """
        self.traced_level = self.current_level
        self.shared_frozen = self.shared != "per_level" and self.traced_level >= 1
        compiled_functions.refresh(self)

    def one_trace(self) -> bool:
        """Whether one traced training step serves every level.

        The level being trained is read from `level_state` inside the step
        (`variable_rule`). Under `shared="freeze"`, level 0 still needs a
        step of its own: its normalization layers train, later levels run
        them as frozen layers, in inference mode. A gated sparsifier's step
        is built for its level's channel codes and target.
        """
        return not self.sparsifier.gated and self.shared != "freeze"

    def trace_key(self) -> tuple:
        """What a traced training step depends on, besides the variables."""
        if self.one_trace():
            return (None, None, self.train_raw)
        level = self.traced_level
        if not self.sparsifier.gated:
            level = min(level, 1)  # every level after the first alike
        return (level, self.shared_frozen, self.train_raw)

    def _training_level(self):
        """The level being trained, as a tensor read inside a traced step."""
        return self.level_state.value[0]

    def variable_rule(self, index: int | str | None):
        """How an optimizer step may change a variable of this model.

        Args:
            index: the variable's index in `prunable_weights`, None for a
                shared weight, or `constraints.GATE` for the gates of a
                gated sparsifier.

        Returns:
            `constraints.FREE`, `constraints.FROZEN` (a shared weight after
            level 0, unless `shared="per_level"`; gates at a level they do not
            act on), `constraints.FrozenAfterFirstLevel` (a shared weight
            under `shared="per_level_statistics"`, in a step that serves every
            level), a `constraints.Projection` for a prunable weight, or a
            `constraints.GateStep` for gates. Fixed when a step is traced,
            for `trace_key()`; a projection reads the level when the step
            runs.
        """
        if index is None:
            if self.shared == "per_level_statistics" and self.one_trace():
                # Trained at level 0 only: read when the step runs.
                return constraints.FrozenAfterFirstLevel(self._training_level)
            return constraints.FROZEN if self.shared_frozen else constraints.FREE
        if index == constraints.GATE:
            if not self.gated_level():
                return constraints.FROZEN  # no gradient reaches them
            return constraints.GateStep(self.sparsifier.gate_learning_rate)
        return constraints.Projection(
            self.level_maps[index],
            self._training_level,
            finished=self.traced_level > 0 or self.one_trace(),
            zero_unused=not self.sparsifier.feedback,
        )

    # -- forward -------------------------------------------------------------

    def _shared_value(self, index, view):
        """Graph value of banked shared weight `index` at level `view`."""
        bank = self.banks[self._bank_of[index]]
        working = self.shared_weights[index].value
        current = self.level_state.value[0]
        use_working = view >= tf.minimum(current, self.num_levels - 1)
        slot = tf.clip_by_value(view, 0, self.num_levels - 2)
        return use_working, tf.where(use_working, working, tf.gather(bank.value, slot))

    def call(self, *args, training=None, **kwargs):
        if self._inner_takes_training:
            kwargs["training"] = training
        mapping, bank_values = [], {}
        # Under LevelScheduler (whose FreezingOptimizer keeps unused weights at
        # zero), training runs on the variables as they are: they hold the
        # current level exactly. Anything else computes at the view level.
        at_view = not (training is True and self.train_raw)
        if training is True and at_view and not constraints.is_internal_training():
            # Python code: runs when the train step is traced, not each step.
            warnings.warn(UNSCHEDULED_TRAINING, stacklevel=2)
        view = self.level_state.value[1]
        if at_view:
            mapping = [
                (w, levels.masked_weight(w.value, m.value, view))
                for w, m in zip(self.prunable_weights, self.level_maps)
            ]
        sparsifier = self.sparsifier
        sparsifier_loss = None
        if not at_view and (
            sparsifier.feedback or type(sparsifier).loss is not _BASE_LOSS
        ):
            keeps = [levels.active_mask(m.value, view) for m in self.level_maps]
            values = [w.value for w in self.prunable_weights]
            if sparsifier.feedback:
                values = [sparsifier.forward(v, k) for v, k in zip(values, keeps)]
                mapping = list(zip(self.prunable_weights, values))
            sparsifier_loss = sparsifier.loss(values, keeps)
        if not at_view and sparsifier.gated:
            k = self.traced_level
            with tf.init_scope():  # the codes do not change within a level
                codes = self.channel_codes()
            values, sparsifier_loss = sparsifier.gated_forward(
                [w.value for w in self.prunable_weights],
                self.gates.value,
                self.gate_keep.value,
                self.gate_order.value,
                codes,
                self.channel_layout,
                k,
                self.sparsities[min(k, self.num_levels - 1)],
            )
            mapping = list(zip(self.prunable_weights, values))
        for i, w in enumerate(self.shared_weights if at_view else []):
            if self._bank_of[i] is None:
                continue
            use_working, value = self._shared_value(i, view)
            mapping.append((w, value))
            bank_values[id(w)] = (use_working, value)
        # Frozen normalization runs in inference mode, as Keras runs a
        # non-trainable BatchNormalization. The flag is read when the layer's
        # call is traced, so it is set for this call only: the model's
        # trainable variables, and so its optimizer's, stay the same.
        made_frozen = [
            (layer, [v.trainable for v in layer.weights])
            for layer in (
                self._shared_only
                if self.shared_frozen and self.shared == "freeze"
                else []
            )
            if layer.trainable
        ]
        for layer, _ in made_frozen:
            layer.trainable = False
        try:
            # Losses the layers add (activity regularizers, add_loss) are
            # collected by the scope and added to this model's.
            with keras.StatelessScope(
                state_mapping=mapping, collect_losses=True
            ) as scope:
                outputs = self.inner_model(*args, **kwargs)
        finally:
            for layer, flags in made_frozen:
                layer.trainable = True
                # The setter sets every variable's flag: restore each one.
                for v, flag in zip(layer.weights, flags):
                    v.trainable = flag
        for loss in scope.losses:
            self.add_loss(loss)
        if sparsifier_loss is not None:
            self.add_loss(sparsifier_loss)
        # Carry out the state updates the model made (normalization
        # statistics, seed generators), except into frozen weights.
        prunable_ids = {id(w) for w in self.prunable_weights}
        unbanked = {
            id(w)
            for w, bank in zip(self.shared_weights, self._bank_of)
            if bank is None and self.shared != "per_level"
        }
        for v in self.inner_model.variables:
            if id(v) in prunable_ids:
                continue
            new = scope.get_current_value(v)
            if new is None:
                continue
            if id(v) in bank_values:
                use_working, mapped = bank_values[id(v)]
                if new is not mapped:
                    v.assign(tf.where(use_working, new, v.value))
            elif id(v) not in unbanked:
                v.assign(new)
            else:
                # Frozen after level 0. Read when the step runs: a step (or
                # a test or predict function) may serve several levels.
                v.assign(tf.where(self._training_level() > 0, v.value, new))
        return outputs

    def compute_output_spec(self, *args, **kwargs):
        kwargs.pop("training", None)
        return self.inner_model.compute_output_spec(*args, **kwargs)

    # -- level transitions (eager) ---------------------------------------------

    def effective_weights(self, level: int) -> dict[int, np.ndarray]:
        """`id(variable)` -> its value at `level`, for every inner weight."""
        values = {}
        for w, m in zip(self.prunable_weights, self.level_maps):
            values[id(w)] = levels.masked_weight(w.value, m.value, level).numpy()
        for i, w in enumerate(self.shared_weights):
            if self._bank_of[i] is not None:
                values[id(w)] = self._shared_value(i, tf.constant(level, tf.int32))[
                    1
                ].numpy()
            else:
                # Not np.array(w.value): NumPy cannot convert a scalar
                # MirroredVariable inside a tf.distribute strategy's scope.
                values[id(w)] = w.numpy()
        return values

    def finish_level(self):
        """Freezes the current level and opens the next one.

        The next level's free weights hold what the sparsifier's
        `end_of_level_values` gives, except that new channels
        (`granularity="channel"`) and units the finished level left unused
        (`_start_unused_units`) start from their layers' initializers.
        """
        k = self.current_level
        if k >= self.num_levels:
            raise ValueError(
                f"All {self.num_levels} levels of {self.name!r} are finished."
            )
        for i, w in enumerate(self.shared_weights):
            if self._bank_of[i] is not None and k < self.num_levels - 1:
                bank = self.banks[self._bank_of[i]]
                bank.assign(tf.tensor_scatter_nd_update(bank.value, [[k]], [w.value]))
        for w, m in zip(self.prunable_weights, self.level_maps):
            # What the sparsifier says the next level's free weights start
            # from; by default zero, so level k+1 starts out computing exactly
            # what level k computes.
            kept = levels.active_mask(m.value, k).numpy()
            w.assign(self.sparsifier.end_of_level_values(w.numpy(), kept))
            if k + 1 < self.num_levels:
                m.assign(levels.open_map(m.numpy(), k + 1))
        if k + 1 < self.num_levels:
            if self.channel_layout is not None:
                self._start_new_channels(k + 1)
            elif self.sparsities[k + 1] == 0.0:
                self._start_unused_units(k)
        self.level_state.assign([k + 1, min(k + 1, self.num_levels - 1)])
        self.sync_level_state()

    def _start_new_channels(self, level: int) -> None:
        """Gives the channels `level` opens fresh weights where they are zero.

        A channel whose filter, bias and normalization are all zero is a
        saddle: its output is constant, BatchNormalization maps it to zero,
        and no gradient reaches its filter, so it would never train. Its
        "out" slices start from its layer's initializers instead (where the
        sparsifier left them at zero). Its "in" slices, where other layers
        read it, stay zero, so level `level` still starts out computing
        exactly what the level before it computes.
        """
        maps = [m.numpy() for m in self.level_maps]
        codes = channel_levels.channel_codes(maps, self.channel_layout)
        fresh = channel_levels.out_slices(
            [c == level for c in codes],
            self.channel_layout,
            [m.shape for m in maps],
        )
        for i, (w, mask) in enumerate(zip(self.prunable_weights, fresh)):
            value = w.numpy()
            mask &= value == 0
            initializer = self._initializers.get(id(w))
            if not mask.any() or initializer is None:
                continue
            start = _fresh_values(initializer, w, seed=(level, i))
            w.assign(np.where(mask, start.astype(value.dtype), value))

    def _start_unused_units(self, level: int) -> None:
        """Gives the units `level` leaves unused fresh incoming weights, when
        the next level keeps every weight (sparsity 0).

        A Dense unit or a convolution filter that keeps no weight at `level`
        computes a constant, its bias; where that is at most zero, ReLU
        passes it no gradient, so its free weights, zero, would stay zero
        (on the digits CNN, 26 of the 64 hidden units: 39% of the dense
        level's weights). Its free incoming weights start from its layer's
        kernel initializer instead, as a new channel's do at channel
        granularity. Its outgoing weights are left alone: where they are free
        (zero), the next level still starts out computing what `level`
        computes. `level`'s own weights never change.

        Only before a dense level: a level that prunes spends its budget on
        live weights anyway (no kept weight of a sparse level was zero in
        the sparsifier benchmark), and fresh random weights would compete
        for that budget with weights growing from zero (measured: 0.5 to 1
        point lost at MNIST-1D's 75% and 50% levels, 6 seeds).
        """
        for i, (w, m) in enumerate(zip(self.prunable_weights, self.level_maps)):
            initializer = self._initializers.get(id(w))
            if initializer is None:
                continue
            value = w.numpy()
            kept = levels.active_mask(m.value, level).numpy()
            fresh = levels.unused_units(kept) & (value == 0)
            if not fresh.any():
                continue
            start = _fresh_values(initializer, w, seed=(level + 1, i))
            w.assign(np.where(fresh, start.astype(value.dtype), value))

    # -- serialization -----------------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "inner_model": _serialize_uncompiled(self.inner_model),
            "sparsities": list(self.sparsities),
            "prune": self.prune,
            "shared": self.shared,
            # As a Keras object, so that a LevelSchedule subclass comes back.
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "sparsifier": keras.saving.serialize_keras_object(self.sparsifier),
            "keep_whole": self.keep_whole,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_model"), custom_objects=custom_objects
        )
        return cls(inner, **config)
