"""`elsa_tf.fit`: train an embedded model's levels, sparsest first."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from elsa_tf import budgets, callbacks, model_ops, sieving_data
from elsa_tf import optimizer as optimizer_lib


def _optimizer_factory(optimizer):
    if isinstance(optimizer, optimizer_lib.FreezingOptimizer):
        raise TypeError(
            "Pass the plain Keras optimizer; elsa_tf.fit wraps it itself. "
            f"Received: optimizer={optimizer!r}"
        )
    if isinstance(optimizer, keras.optimizers.Optimizer):
        config = keras.optimizers.serialize(optimizer)
        return lambda: keras.optimizers.deserialize(config)
    if isinstance(optimizer, str):
        keras.optimizers.get(optimizer)  # fails now, on an unknown name
        return lambda: keras.optimizers.get(optimizer)
    if callable(optimizer) and not isinstance(optimizer, type):
        return optimizer
    raise TypeError(
        "optimizer must be a keras.optimizers.Optimizer instance or a "
        f"zero-argument factory returning one. Received: optimizer={optimizer!r}"
    )


def _compiled_alike(model, inner) -> bool:
    """Whether `model`'s FreezingOptimizer wraps an optimizer configured as
    `inner`, so that resetting it (as `LevelScheduler` does at the start of
    a level) gives what compiling `inner` would, and the level's steps can
    keep the functions traced before it (`elsa_tf.compiled_functions`)."""
    current = getattr(model, "optimizer", None)
    if not isinstance(current, optimizer_lib.FreezingOptimizer):
        return False
    old = current.inner_optimizer
    if type(old) is not type(inner) or getattr(inner, "use_ema", False):
        # Moving averages start from the weights when built: not reset.
        return False
    try:
        config = {k: v for k, v in inner.get_config().items() if k != "name"}
        return bool(
            config == {k: v for k, v in old.get_config().items() if k != "name"}
        )
    except Exception:  # no config (a schedule without one), or not comparable
        return False


def _training_inputs(x, steps_per_epoch=None):
    """What `recalibration_data="auto"` re-estimates statistics on, or None.

    `x` itself when it is an array or a finite dataset; one epoch of a
    dataset of infinite or unknown length when `steps_per_epoch` says how
    long that is; otherwise nothing.
    """
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, tf.data.Dataset):
        if int(x.cardinality()) >= 0:
            return x
        if steps_per_epoch is not None:
            return x.take(int(steps_per_epoch))
    return None


def fit(
    model: keras.Model,
    x=None,
    y=None,
    *,
    epochs_per_level: int | list[int],
    optimizer,
    loss,
    metrics=None,
    levels=None,
    initial_epoch: int = 0,
    recalibration_data="auto",
    sieving=None,
    layer_freezing=None,
    **fit_kwargs,
) -> list:
    """Trains the levels of an embedded model in order, sparsest first.

    Each level trains with a fresh copy of `optimizer` wrapped in a
    `FreezingOptimizer` (when the copy is configured as the level before's,
    that one is reset to its just-built state instead, which is the same,
    and the traced training step is kept), trained for its
    `epochs_per_level` epochs under a `LevelScheduler`, then frozen.
    Training can be split across calls: `fit(..., levels=[0])` then
    `fit(..., levels=[1, 2])` trains the same way as one call.

    Args:
        model: a model returned by `elsa_tf.embed`.
        x: inputs, anything `keras.Model.fit` accepts.
        y: targets, or None when `x` yields them.
        epochs_per_level: epochs spent on each level: an int, or a list with
            one entry per level of the model, sparsest first. Later levels
            start from the level before them and need fewer epochs:
            `elsa_tf.budgets.front_loaded(epochs, num_levels)` gives the
            sparsest level the epochs of one separately trained model and
            the later ones less. Each level's pruning schedule stretches
            over its own epochs.
        optimizer: a Keras optimizer (a fresh copy is used for each level),
            its name as for `compile` (`"adam"`), or a zero-argument factory
            that returns one.
        loss: the loss, as for `keras.Model.compile`.
        metrics: metrics, as for `keras.Model.compile`.
        levels: the levels to train, consecutive from the model's current
            level; None trains all the levels left.
        initial_epoch: epochs the first level has already trained, to resume
            a run interrupted mid-level. The model must be the one saved then,
            compiled with its `FreezingOptimizer` (as `keras.saving.load_model`
            returns it): that level carries on with the saved optimizer state.
        recalibration_data: training inputs, not augmented (an array, or a
            dataset of inputs or `(x, y)`): BatchNormalization statistics are
            re-estimated on them at the end of every level, before it is
            frozen, so that short levels do not freeze lagging statistics.
            `"auto"` (the default) uses `x` when it is a NumPy array or a
            finite `tf.data.Dataset` (one epoch, `steps_per_epoch` batches,
            of an infinite one), and nothing otherwise; pass un-augmented
            inputs here if `x` is augmented. None re-estimates nothing.
            Measured on a digits CNN with BatchNormalization: without it
            ELSA trailed separately pruned models by 1.5 to 2.6 points, with
            it by at most 0.9 (issue 10). Models without BatchNormalization
            are not affected.
        sieving: None, an `elsa_tf.DataSieve`, or an
            `elsa_tf.SievingCallback` around one (made with the `state` of
            an interrupted run, to resume it): SpFDE's circular data
            sieving (`elsa_tf.sieving_data`). Each epoch trains on all but a
            held-out share of the examples; every `interval` epochs the
            easiest of them (the fewest forgetting events) swap with the
            held-out queue's head. `x` and `y` must be arrays, or `x` a finite
            `tf.data.Dataset` of unbatched `(x, y)` examples in a fixed order;
            `batch_size` and `shuffle` apply to the sieved data. The sieve
            carries on across levels; each level's history holds the examples
            of every epoch (`history.history["examples"]`). Off by default.
        layer_freezing: None, or an `elsa_tf.LayerFreezing`: SpFDE's
            progressive layer freezing inside each level. Once the level's
            masks are final, one more front block of the network stops
            training every `interval` epochs, until the planned share of the
            level's training FLOPs is saved; no backward pass runs through
            frozen front blocks. The blocks train again at the next level:
            this is apart from ELSA's permanent freezing of finished levels.
            Each level's history holds the frozen count and the share of the
            training multiply-adds saved, per epoch
            (`history.history["frozen_blocks"]`, `["flops_saved"]`). Off by
            default.
        **fit_kwargs: passed to `keras.Model.fit` (`batch_size`,
            `validation_data`, `callbacks`, `steps_per_epoch`, ...).

    Returns:
        One `keras.callbacks.History` per level trained.

    Raises:
        ValueError: if the model is not embedded, or `levels` or
            `epochs_per_level` is invalid.
        TypeError: if `optimizer` is neither an optimizer nor a factory.
    """
    num_levels = len(model_ops.owner(model).sparsities)  # Raises if not embedded.
    level_epochs = budgets.level_epochs(epochs_per_level, num_levels)
    levels = callbacks.resolve_levels(model, levels)
    make_optimizer = _optimizer_factory(optimizer)
    model_ops.check_int_below(
        "initial_epoch",
        initial_epoch,
        f"the epochs of level {levels[0]}",
        level_epochs[levels[0]],
    )
    optimizer_now = getattr(model, "optimizer", None)
    if initial_epoch and not isinstance(optimizer_now, optimizer_lib.FreezingOptimizer):
        raise ValueError(
            "Resuming a level (initial_epoch > 0) needs the model saved "
            "mid-level, compiled with its elsa_tf.FreezingOptimizer. Received: "
            f"optimizer={optimizer_now!r}"
        )
    if "epochs" in fit_kwargs:
        raise TypeError(
            "elsa_tf.fit sets epochs itself from epochs_per_level. "
            f"Received: epochs={fit_kwargs['epochs']!r}"
        )
    if isinstance(recalibration_data, str):
        if recalibration_data != "auto":
            raise ValueError(
                'recalibration_data must be "auto", None, an array or a '
                f"dataset. Received: recalibration_data={recalibration_data!r}"
            )
        recalibration_data = _training_inputs(x, fit_kwargs.get("steps_per_epoch"))
    user_callbacks = list(fit_kwargs.pop("callbacks", None) or [])
    if sieving is not None:
        if isinstance(sieving, sieving_data.DataSieve):
            sieve = sieving_data.SievingCallback(sieving)
        elif isinstance(sieving, sieving_data.SievingCallback):
            # Made with a saved state, to resume; or one an earlier call
            # trained with (levels split across calls): it carries on.
            sieve = sieving
            sieve.carry_on()
        else:
            raise TypeError(
                "sieving must be an elsa_tf.DataSieve, an "
                f"elsa_tf.SievingCallback or None. Received: sieving={sieving!r}"
            )
        batch_size = fit_kwargs.pop("batch_size", None) or 32
        if isinstance(recalibration_data, tf.data.Dataset) and recalibration_data is x:
            # Examples, not batches: statistics are re-estimated on batches.
            recalibration_data = x.batch(batch_size)
        x = sieve.dataset(
            x, y, batch_size=batch_size, shuffle=fit_kwargs.pop("shuffle", True)
        )
        fit_kwargs["shuffle"] = False  # the sieved dataset shuffles itself
        y = None
        user_callbacks.insert(0, sieve)
    histories = []
    compiled_here = False  # with this call's loss and metrics
    for i, level in enumerate(levels):
        start = initial_epoch if i == 0 else 0
        if not start:
            # Under the strategy the model was built with (tf.distribute), as
            # Keras wants an optimizer made and compiled: then this function,
            # like `model.fit`, may be called outside `strategy.scope()`.
            with model.distribute_strategy.scope():
                inner = make_optimizer()
                if not isinstance(inner, keras.optimizers.Optimizer):
                    raise TypeError(
                        "The optimizer factory must return a "
                        f"keras.optimizers.Optimizer. Received: {inner!r}"
                    )
                # Compiled by this call for a level before, with an
                # optimizer like this one: `LevelScheduler` resets it instead,
                # so that the levels after it can keep their traced step.
                if not (compiled_here and _compiled_alike(model, inner)):
                    compiled_here = True
                    model.compile(
                        optimizer=optimizer_lib.FreezingOptimizer(inner),
                        loss=loss,
                        metrics=metrics,
                    )
        scheduler = callbacks.LevelScheduler(
            epochs_per_level,
            levels=[level],
            steps_per_epoch=fit_kwargs.get("steps_per_epoch"),
            recalibration_data=recalibration_data,
            layer_freezing=layer_freezing,
        )
        history = model.fit(
            x,
            y,
            epochs=level_epochs[level],
            initial_epoch=start,
            callbacks=[scheduler, *user_callbacks],
            **fit_kwargs,
        )
        histories.append(history)
    return histories
