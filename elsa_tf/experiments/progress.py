"""`LevelProgress`: the level's sparsity in the progress, TensorBoard per level.

At the end of every epoch it adds the level's achieved sparsity to the
epoch's logs (so Keras's progress bar shows it) and writes the logs under
`log_dir/level_<k>` for TensorBoard. The line at the start of every level
(which level, its sparsity, how many weights it may use) is
`LevelScheduler`'s.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from elsa_tf import model_ops, reporting


class LevelProgress(keras.callbacks.Callback):
    """Logs loss, accuracy and sparsity per level.

    Place it after the `LevelScheduler` (as `elsa_tf.fit` places user
    callbacks) and before Keras's progress bar, which Keras adds last.

    Args:
        log_dir: TensorBoard directory, or None for no TensorBoard logs.
    """

    def __init__(self, log_dir=None):
        super().__init__()
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self._writers = {}

    def _writer(self, level: int):
        if level not in self._writers:
            path = os.path.join(self.log_dir, f"level_{level}")
            self._writers[level] = tf.summary.create_file_writer(path)
        return self._writers[level]

    def on_epoch_begin(self, epoch, logs=None):
        self._level = model_ops.current_level(self.model)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        # What the level uses so far (reporting.summary's achieved sparsity).
        logs["sparsity"] = reporting.summary(self.model)[self._level][
            "achieved_sparsity"
        ]
        if self.log_dir is None:
            return
        with self._writer(self._level).as_default(step=epoch):
            for name, value in logs.items():
                tf.summary.scalar(name, float(value))
            tf.summary.scalar(
                "learning_rate",
                float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            )

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.flush()
