"""`FreezingOptimizer`: keeps the weights of finished levels exactly as they are.

Masking gradients is not enough: momentum, Adam's moments and decoupled weight
decay all move a weight whose gradient is zero. So variables frozen whole are
not passed to the inner optimizer at all, and a prunable weight is projected
after each update (`ElsaModel` docs): frozen entries are written back from a
copy taken just before, entries the level does not use go back to zero. In a
step traced once for every level, a shared weight frozen after level 0 is
written back whole the same way (`constraints.FrozenAfterFirstLevel`).
Channel gates (`PolarizedGates`) take their own clamped gradient step
(`constraints.GateStep`) instead of the inner optimizer's.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from elsa_tf import constraints


@keras.saving.register_keras_serializable(package="elsa_tf")
class FreezingOptimizer(keras.optimizers.Optimizer):
    """Wraps a Keras optimizer so that it never changes frozen weights.

    Modelled on `keras.optimizers.LossScaleOptimizer`: learning rate and
    iterations are the inner optimizer's, and the inner optimizer is saved in
    the config. `reset()` returns the inner optimizer to its freshly built
    state (slots, iterations, learning rate), which `LevelScheduler` calls at
    the start of every level: weights that become trainable again start with
    clean slots, as rigl's `reset_momentum` does, and each level trains as if
    with a fresh optimizer.

    Args:
        inner_optimizer: the `keras.optimizers.Optimizer` to wrap, or its
            identifier as `model.compile` takes it (`"adam"`, a config dict).
        name: optional name.
        **kwargs: none: base-optimizer arguments (`clipnorm`,
            `weight_decay`, `use_ema`, ...) belong to the inner optimizer,
            and are refused here rather than silently ignored.

    Example:

    >>> opt = FreezingOptimizer(keras.optimizers.Adam(0.5))
    >>> float(opt.learning_rate)
    0.5
    """

    def __init__(self, inner_optimizer, name: str | None = None, **kwargs):
        if kwargs:
            raise ValueError(
                "FreezingOptimizer takes no base optimizer arguments; set them "
                f"on the inner_optimizer. Received: {kwargs}"
            )
        if isinstance(inner_optimizer, (str, dict)):
            # As model.compile(optimizer="adam") takes it.
            inner_optimizer = keras.optimizers.get(inner_optimizer)
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "inner_optimizer must be a keras.optimizers.Optimizer instance or "
                "an optimizer name. "
                f"Received: inner_optimizer={inner_optimizer!r}"
            )
        if isinstance(inner_optimizer, FreezingOptimizer):
            raise TypeError("inner_optimizer is already a FreezingOptimizer.")
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self._initial_values = None

    def build(self, var_list):
        # Built eagerly even when first called from a traced train step, so
        # that the initial values `reset()` returns to can be read.
        with tf.init_scope():
            self.inner_optimizer.build(var_list)
            super().build(var_list)
            self._record_initial_values()

    def _record_initial_values(self):
        # A constant is stored as one scalar: slots start as zeros (Adagrad's
        # as a constant), so resetting costs no copy of the optimizer state.
        self._initial_values = []
        for v in self.inner_optimizer.variables:
            # `numpy()`, not `np.array(v.value)`: under a tf.distribute
            # strategy's scope, NumPy cannot convert a scalar MirroredVariable
            # (the iteration count, the learning rate).
            value = v.numpy()
            flat = value.reshape(-1)
            if flat.size and np.all(flat == flat[0]):
                self._initial_values.append(flat[0])
            else:
                self._initial_values.append(value.copy())

    def reset(self) -> None:
        """Puts the inner optimizer back in its just-built state."""
        if self._initial_values is None:
            return
        for v, initial in zip(self.inner_optimizer.variables, self._initial_values):
            v.assign(np.broadcast_to(initial, v.shape).astype(v.dtype))

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    # Keras saves the tracked inner optimizer's variables on its own; saving
    # `variables` here too would store the optimizer state twice (Keras 3's
    # LossScaleOptimizer does).
    def save_own_variables(self, store):
        for i, v in enumerate(self._variables):
            store[str(i)] = v.numpy()  # see _record_initial_values

    def load_own_variables(self, store):
        if len(store.keys()) != len(self._variables):
            raise ValueError(
                f"FreezingOptimizer expected {len(self._variables)} variables, "
                f"but the saved file has {len(store.keys())}."
            )
        for i, v in enumerate(self._variables):
            v.assign(store[str(i)])

    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        updates, projected, own = [], [], []
        for g, v in zip(grads, trainable_variables):
            constraint = constraints.training_constraint(v)
            if constraint is constraints.FROZEN:
                continue
            if isinstance(constraint, constraints.GateStep):
                own.append((g, v, constraint))  # not the inner optimizer's
                continue
            if isinstance(constraint, constraints.FrozenAfterFirstLevel):
                g = constraint.gradient(g)
            updates.append((g, v))
            if constraint is not constraints.FREE:
                old = tf.identity(v.value) if constraint.needs_old else None
                projected.append((v, constraint, old))
        if updates:
            self.inner_optimizer.apply(*map(list, zip(*updates)))
        for v, project, old in projected:
            v.assign(project(old, v.value))
        own = [(g, v, step) for g, v, step in own if g is not None]
        context = tf.distribute.get_replica_context()
        if own and context is not None and context.num_replicas_in_sync > 1:
            # Summed over the replicas, as the inner optimizer sums its own
            # (Keras scales the loss by the global batch), so that every
            # replica takes the same step.
            grads = context.all_reduce(
                tf.distribute.ReduceOp.SUM, [g for g, _, _ in own]
            )
            own = [(g, v, step) for g, (_, v, step) in zip(grads, own)]
        for g, v, step in own:
            v.assign(step(v.value, g))

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        # Like LossScaleOptimizer: only the name and the inner optimizer.
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)
