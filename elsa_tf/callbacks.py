"""`LevelScheduler`: drives ELSA's levels from inside `model.fit`.

Every `epochs_per_level` epochs make one level (or its entry for that level,
when it is a list: `elsa_tf.budgets`). Inside a level the tfmot
pruning schedule built by the model's `LevelSchedule` says, step by step,
when to update the masks (or the sparsifier's `update_interval` does) and to
which sparsity, and the model's `Sparsifier` says which weights; at the
level's last epoch the level is pruned to its exact target, frozen, and the
next level opens with a freshly reset optimizer.

With `layer_freezing` (`elsa_tf.LayerFreezing`), front blocks of the network
are also frozen for the last epochs of each level (SpFDE's progressive layer
freezing) and released at its end: that freezing is temporary, unlike the
permanent freezing of finished levels.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
from absl import logging as absl_logging

from elsa_tf import batch_norm, budgets, model_ops
from elsa_tf import layer_freezing as layer_freezing_lib
from elsa_tf import optimizer as optimizer_lib

check_positive_int = model_ops.check_positive_int


check_epochs_per_level = budgets.check_epochs_per_level


def resolve_levels(model, levels) -> list[int]:
    """The levels to train: consecutive, starting at the model's current level.

    Raises:
        ValueError: for a level out of range, a level already finished, or a
            list that skips a level.
    """
    num = len(model_ops.sparsities(model))
    current = model_ops.current_level(model)
    if levels is None:
        levels = list(range(current, num))
        if not levels:
            raise ValueError(f"All {num} levels of the model are already finished.")
        return levels
    if isinstance(levels, (int, np.integer)) and not isinstance(levels, bool):
        levels = [int(levels)]
    levels = list(levels)
    if not levels:
        raise ValueError("levels must name at least one level. Received: levels=[]")
    for level in levels:
        model_ops.check_level(model, level, name="levels")
    if levels[0] < current:
        raise ValueError(
            f"Level {levels[0]} is already finished (the model is at level "
            f"{current}). Received: levels={levels}"
        )
    expected = list(range(current, current + len(levels)))
    if levels != expected:
        raise ValueError(
            f"Levels are trained in order from the current level {current}: "
            f"expected levels={expected}. Received: levels={levels}"
        )
    return levels


def _print_level_header(model, level: int) -> None:
    """One line before a level's epochs, as Keras prints `Epoch 1/3`."""
    total = sum(c["size"] for c in model_ops.level_counts(model))
    sparsities = model_ops.sparsities(model)
    target = sparsities[level]
    message = (
        f"Level {level} of {len(sparsities)}: target sparsity "
        f"{target:.2%}, {round(total * (1 - target)):,} of {total:,} prunable "
        "weights"
    )
    # Where Keras's own progress goes: stdout, or absl's log when the user
    # turned interactive logging off.
    if keras.utils.is_interactive_logging_enabled():
        print(message, flush=True)
    else:
        absl_logging.info(message)


@keras.saving.register_keras_serializable(package="elsa_tf")
class LevelScheduler(keras.callbacks.Callback):
    """Trains an embedded model's levels in turn during `model.fit`.

    Use it with a `FreezingOptimizer`; `elsa_tf.fit` does exactly this, one
    level per `model.fit` call.

    Args:
        epochs_per_level: epochs spent on each level: an int, or a list with
            one entry per level of the model, sparsest first (see
            `elsa_tf.budgets.front_loaded`). The level's pruning schedule
            stretches over its own epochs.
        levels: the levels to train, consecutive from the model's current
            level; None trains every level left.
        steps_per_epoch: steps in an epoch, needed only when `fit` cannot
            tell (a dataset of unknown length).
        recalibration_data: training inputs (an array, or a dataset of
            inputs or `(x, y)`), not augmented. When given, BatchNormalization
            moving statistics are re-estimated on them at the end of every
            level, before it is frozen (`elsa_tf.recalibrate_batch_norm`).
            Not part of the config: pass it again to a restored scheduler.
        layer_freezing: None, or an `elsa_tf.LayerFreezing`: SpFDE's
            progressive layer freezing inside every level. Front blocks of
            the inner model are set non-trainable, one more every `interval`
            epochs once the level's masks are fixed, and all are released
            at the level's end (before it is pruned, recalibrated and
            frozen). After `fit`, `freezing_plans` holds each level's plan
            (`elsa_tf.layer_freezing.LevelFreezing`) and `frozen_blocks` a
            `(level, epoch_in_level, frozen front blocks)` triple for every
            epoch trained; each epoch's logs (and so the `History`) get
            `frozen_blocks` and `flops_saved`, the share of the epoch's
            training multiply-adds that freezing saved. Off by default.

    Attributes:
        freezing_plans: with `layer_freezing`, the plan of each level this
            scheduler trained (its blocks, the frozen count per epoch and the
            planned share of the level's training FLOPs saved).
        frozen_blocks: with `layer_freezing`, `(level, epoch_in_level, n)`
            for every epoch trained: its first `n` blocks were frozen.

    Example:

    ```python
    model.compile(optimizer=elsa_tf.FreezingOptimizer(keras.optimizers.Adam()),
                  loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=3 * len(sparsities),
              callbacks=[elsa_tf.LevelScheduler(epochs_per_level=3)])
    ```
    """

    def __init__(
        self,
        epochs_per_level: int,
        levels=None,
        steps_per_epoch=None,
        recalibration_data=None,
        layer_freezing=None,
    ):
        super().__init__()
        self.recalibration_data = recalibration_data
        if isinstance(layer_freezing, dict):
            layer_freezing = keras.saving.deserialize_keras_object(layer_freezing)
        if layer_freezing is not None and not isinstance(
            layer_freezing, layer_freezing_lib.LayerFreezing
        ):
            raise TypeError(
                "layer_freezing must be an elsa_tf.LayerFreezing or None. "
                f"Received: layer_freezing={layer_freezing!r}"
            )
        self.layer_freezing = layer_freezing
        self.freezing_plans: list[layer_freezing_lib.LevelFreezing] = []
        self.frozen_blocks: list[tuple[int, int, int]] = []
        self._freezer = None
        self.epochs_per_level = check_epochs_per_level(epochs_per_level)
        self.levels = None if levels is None else list(levels)
        if steps_per_epoch is not None:
            steps_per_epoch = check_positive_int("steps_per_epoch", steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch

    def on_train_begin(self, logs=None):
        model = self.model
        if not isinstance(model.optimizer, optimizer_lib.FreezingOptimizer):
            raise TypeError(
                "LevelScheduler needs the model compiled with an "
                "elsa_tf.FreezingOptimizer, or finished levels would change. "
                f"Received: optimizer={model.optimizer!r}"
            )
        self._levels = resolve_levels(model, self.levels)
        epochs = budgets.level_epochs(
            self.epochs_per_level, len(model_ops.sparsities(model))
        )
        self._level_epochs = [epochs[level] for level in self._levels]
        steps = self.steps_per_epoch or (self.params or {}).get("steps")
        if not steps:
            raise ValueError(
                "LevelScheduler cannot tell the number of steps per epoch: pass "
                "steps_per_epoch to it (and to fit). Received: steps_per_epoch=None"
            )
        self._steps = int(steps)
        self._position = None  # index into self._levels; set by the first epoch
        self._epoch_in_level = 0
        self._prune_at = {}
        self._freezing_plan = None
        self.freezing_plans, self.frozen_blocks = [], []
        if self.layer_freezing is not None:
            blocks = self.layer_freezing.split(model_ops.owner(model).inner_model)
            self._blocks = [block for block, _ in blocks]
            self._freezer = layer_freezing_lib.BlockFreezer(
                [layers for _, layers in blocks]
            )
        # The FreezingOptimizer checked above keeps unused weights at zero, so
        # the model may train on its raw weights (no mask in the step).
        model_ops.set_raw_training(model, True)
        model_ops.reset_compiled_functions(model, in_fit=True)

    def on_train_end(self, logs=None):
        if self._freezer is not None:
            # A run that stops inside a level leaves nothing frozen.
            self._freezer.release()
        model_ops.set_raw_training(self.model, False)
        model_ops.reset_compiled_functions(self.model)

    def _first_epoch_in_level(self, epoch: int) -> int:
        """Where fit's first epoch falls in the first level trained.

        `initial_epoch` resumes an interrupted run. With one int, the epochs
        of every level are alike and the first epoch is `epoch %
        epochs_per_level` into the model's current level, whatever the
        epochs were counted from. With a list, fit's epochs count from the
        start of the current level.
        """
        first = self._level_epochs[0]
        if isinstance(self.epochs_per_level, int):
            return epoch % first
        if epoch >= first:
            raise ValueError(
                f"model.fit starts at epoch {epoch}, but level {self._levels[0]} "
                f"trains for {first} epochs: with a list epochs_per_level, "
                "fit's epochs count from the start of the model's current "
                f"level. Received: initial_epoch={epoch}"
            )
        return epoch

    def on_epoch_begin(self, epoch, logs=None):
        first = self._position is None
        if first:
            self._position = 0
            self._epoch_in_level = self._first_epoch_in_level(epoch)
            self._check_epochs(epoch)
        if self._position >= len(self._levels):
            self.model.stop_training = True
            return
        if self._epoch_in_level == 0 or first:
            self._start_level(
                self._levels[self._position], fresh=self._epoch_in_level == 0
            )
        if self._freezer is not None:
            self._freeze_blocks()

    def _freeze_blocks(self) -> None:
        """Freezes the front blocks the level's plan gives for this epoch.

        Blocks are frozen only while an epoch trains (released again at its
        end, so that a model saved between epochs keeps its own `trainable`
        flags); the train function is traced once for each frozen set and
        level state (`elsa_tf.compiled_functions`).
        """
        n = self._freezing_plan.frozen[self._epoch_in_level]
        if n and not self.model.optimizer.built:
            # Built on every variable, so that released blocks are known to it.
            with self.model.distribute_strategy.scope():
                self.model.optimizer.build(self.model.trainable_variables)
        self._freezer.set_frozen(n)
        model_ops.reset_compiled_functions(self.model, in_fit=True)
        self.frozen_blocks.append(
            (self._levels[self._position], self._epoch_in_level, n)
        )

    def _check_epochs(self, initial_epoch: int) -> None:
        """Warns when `fit`'s epochs do not end on the last level's end."""
        epochs = (self.params or {}).get("epochs")
        if epochs is None:
            return
        done_before = self._epoch_in_level
        needed = sum(self._level_epochs) - done_before
        given = epochs - initial_epoch
        if given < needed:
            # The level the run stops in, and how far into it.
            into = given + done_before
            position = 0
            while into >= self._level_epochs[position]:
                into -= self._level_epochs[position]
                position += 1
            level = self._levels[position]
            warnings.warn(
                f"model.fit(epochs={epochs}) ends {into} of "
                f"{self._level_epochs[position]} epochs into level {level}: that "
                "level is left unfinished (not pruned to its target, not "
                f"frozen). Train levels {self._levels} with epochs="
                f"{initial_epoch + needed}, or resume it later with "
                f"initial_epoch={initial_epoch + given}.",
                stacklevel=2,
            )
        elif given > needed:
            warnings.warn(
                f"model.fit(epochs={epochs}) asks for {given - needed} epochs "
                f"more than levels {self._levels} take at epochs_per_level="
                f"{self.epochs_per_level}: training stops after epoch "
                f"{initial_epoch + needed}.",
                stacklevel=2,
            )

    def _start_level(self, level, fresh: bool):
        model = self.model
        model_ops.set_view_level(model, level)
        if fresh and (self.params or {}).get("verbose", 1):
            _print_level_header(model, level)
        if fresh:
            # A resumed level keeps the optimizer state it was saved with.
            model.optimizer.reset()
        level_steps = self._level_epochs[self._position] * self._steps
        self._prune_at = model_ops.mask_update_steps(model, level, level_steps)
        if self._freezer is not None:
            self._plan_freezing(level)

    def _plan_freezing(self, level: int) -> None:
        epochs = self._level_epochs[self._position]
        updates = list(self._prune_at)
        if model_ops.owner(self.model).sparsifier.gated:
            # Gates move every step of the level: its masks are never fixed.
            updates.append(epochs * self._steps - 1)
        plan = self.layer_freezing.plan_level(
            self._blocks, level, epochs, self._steps, updates
        )
        if self.freezing_plans and self.freezing_plans[-1].level == level:
            self.freezing_plans[-1] = plan  # a resumed level
        else:
            self.freezing_plans.append(plan)
        self._freezing_plan = plan

    def on_train_batch_begin(self, batch, logs=None):
        step = self._epoch_in_level * self._steps + batch
        sparsity = self._prune_at.get(step)
        if sparsity is not None:
            model_ops.prune_to(self.model, sparsity, step)

    def on_epoch_end(self, epoch, logs=None):
        if self._position is None or self._position >= len(self._levels):
            return
        if self._freezer is not None:
            # The train function stays as traced: the next epoch refreezes.
            self._freezer.release()
            if logs is not None:
                # Into the History: what the epoch froze, and the share of
                # its training multiply-adds that saved.
                n = self.frozen_blocks[-1][2]
                logs["frozen_blocks"] = n
                logs["flops_saved"] = self._freezing_plan.saved_share(n)
        self._epoch_in_level += 1
        if self._epoch_in_level == self._level_epochs[self._position]:
            level = model_ops.current_level(self.model)
            # The level's final masks first, so that the statistics are
            # re-estimated for the weights it keeps.
            model_ops.prune_to(self.model, model_ops.sparsities(self.model)[level])
            if self.recalibration_data is not None:
                batch_norm.recalibrate_batch_norm(self.model, self.recalibration_data)
            model_ops.finish_level(self.model)
            model_ops.reset_compiled_functions(self.model, in_fit=True)
            self._position += 1
            self._epoch_in_level = 0
            if self._position >= len(self._levels):
                self.model.stop_training = True

    def get_config(self):
        config = {
            "epochs_per_level": self.epochs_per_level,
            "levels": self.levels,
            "steps_per_epoch": self.steps_per_epoch,
        }
        if self.layer_freezing is not None:
            # As a Keras object, so that a LayerFreezing subclass comes back;
            # left out when off, so that configs without it stay as they were.
            config["layer_freezing"] = keras.saving.serialize_keras_object(
                self.layer_freezing
            )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
