"""`elsa_tf.function`: a `tf.function` for custom training loops that follows
the embedded model's level.

A traced training step bakes in how the optimizer treats each variable (which
are frozen whole, which are projected onto the level read from a variable)
and whether normalization layers are frozen. `model.fit` under
`LevelScheduler` puts the right train function in place by itself
(`elsa_tf.compiled_functions`); a custom loop's own `tf.function` traced at
level 0 would keep training shared weights that later levels freeze.
`elsa_tf.function(model)` keeps one trace per state of the model that a step
depends on (`ElsaModel.trace_key`: every level after the first shares one,
and under `shared="per_level_statistics"` level 0 too) and picks the right
one at every call, so a custom loop needs no retrace discipline of its own. Its steps
train the current level as `model.fit` does under `LevelScheduler`: compute
gradients with `model(x, training=True)` and apply them with a
`FreezingOptimizer`.
"""

from __future__ import annotations

import functools

import tensorflow as tf

from elsa_tf import model_ops


class LevelFunction:
    """A callable that runs `fn` as a `tf.function` traced for the model's level.

    Made by `elsa_tf.function`; see there.
    """

    def __init__(self, model, fn, **tf_function_kwargs):
        self._owner = model_ops.owner(model)
        self._fn = fn
        self._kwargs = tf_function_kwargs
        self._traced = {}
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        owner = self._owner
        before = owner.train_raw
        # As under LevelScheduler: the step trains the current level, whose
        # FreezingOptimizer keeps the weights it does not use at zero.
        owner.train_raw = True
        try:
            key = owner.trace_key()
            traced = self._traced.get(key)
            if traced is None:
                traced = self._traced[key] = tf.function(self._fn, **self._kwargs)
            return traced(*args, **kwargs)
        finally:
            owner.train_raw = before


def function(model, fn=None, **tf_function_kwargs):
    """Like `tf.function`, for a step that trains an embedded model.

    The step is traced again whenever the model's trace key changes with
    its level (`elsa_tf.finish_level`, `LevelScheduler`), as `model.fit`
    does with its own train function.

    Args:
        model: the embedded model the step trains.
        fn: the step; omit it to use `function(model)` as a decorator.
        **tf_function_kwargs: passed to `tf.function` (`jit_compile`, ...).

    Returns:
        A callable with `fn`'s signature.

    Raises:
        ValueError: if `model` is not embedded.

    Example:

        @elsa_tf.function(model)
        def train_step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            variables = model.trainable_variables
            optimizer.apply(tape.gradient(loss, variables), variables)
            return loss
    """
    model_ops.owner(model)  # Raises now for a model that is not embedded.
    if fn is None:
        return lambda f: LevelFunction(model, f, **tf_function_kwargs)
    return LevelFunction(model, fn, **tf_function_kwargs)
