"""Checkpoints after every epoch, so that an interrupted run can resume.

A checkpoint is the whole embedded model saved with Keras (`.keras`: weights,
level maps, the level reached, and the compiled `FreezingOptimizer` with its
state) plus `checkpoint.json`, which names the file and says where training
stands: the level being trained and the epochs it has done. The model file is
written under a new name first and `checkpoint.json` is replaced atomically
after it, so a run killed at any moment leaves a readable checkpoint: the new
one or the one before.
"""

from __future__ import annotations

import json
import os
import time

import keras

from elsa_tf import model_ops

STATE_FILE = "checkpoint.json"


def latest(directory) -> dict | None:
    """The state of the newest checkpoint in `directory`, or None.

    The state has `path` (the model file), `level` (the level to train next,
    equal to the number of levels once training is over), `epoch_in_level`
    (epochs that level has done), `epochs` (all epochs done) and
    `train_seconds` (training time so far).
    """
    state_path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(state_path):
        return None
    with open(state_path) as f:
        state = json.load(f)
    state["path"] = os.path.join(directory, state["file"])
    if not os.path.exists(state["path"]):
        raise FileNotFoundError(
            f"{state_path} names a model file that is missing: {state['path']}"
        )
    return state


def save(model, directory, state: dict) -> dict:
    """Saves `model` and `state` as the newest checkpoint; drops older ones."""
    os.makedirs(directory, exist_ok=True)
    previous = latest(directory)
    number = (previous or {}).get("number", -1) + 1
    file = f"model-{number:05d}.keras"
    model.save(os.path.join(directory, file))
    state = {**state, "number": number, "file": file}
    tmp = os.path.join(directory, STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        # Compact once it holds the data sieve's per-example arrays (one line
        # per number otherwise: 150,000 lines for CIFAR-10).
        json.dump(state, f, indent=None if "sieve" in state else 2)
    os.replace(tmp, os.path.join(directory, STATE_FILE))
    for name in os.listdir(directory):
        if name.startswith("model-") and name != file:
            os.remove(os.path.join(directory, name))
    return {**state, "path": os.path.join(directory, file)}


def load(state: dict):
    """The model of a checkpoint, compiled with its saved optimizer state."""
    return keras.saving.load_model(state["path"])


class Checkpointer(keras.callbacks.Callback):
    """Saves a checkpoint at the end of every epoch of `elsa_tf.fit`.

    Place it after the `LevelScheduler` (as `elsa_tf.fit` does with user
    callbacks), so that a level's last epoch is saved with the level finished.
    It also keeps the training time, `train_seconds`: the time epochs take,
    a level's end included, saving and validation left out.

    Args:
        directory: where checkpoints go.
        epochs: epochs done before this run (a resumed run's count).
        train_seconds: training time before this run.
        examples: the examples of each epoch before this run, when data
            sieving logged them (`logs["examples"]`).
        flops_saved: the share of each epoch's training FLOPs saved before
            this run, when layer freezing logged it (`logs["flops_saved"]`).
        sieve: the run's `elsa_tf.SievingCallback`, under data sieving: its
            state is saved with every checkpoint, to resume it from.
    """

    def __init__(
        self,
        directory,
        epochs=0,
        train_seconds=0.0,
        examples=None,
        flops_saved=None,
        sieve=None,
    ):
        super().__init__()
        self.directory = os.fspath(directory)
        self.epochs = epochs
        self.train_seconds = train_seconds
        # Examples trained on in each epoch, when data sieving logs them.
        self.examples = list(examples or [])
        # The share of each epoch's training FLOPs layer freezing saved.
        self.flops_saved = list(flops_saved or [])
        self.sieve = sieve
        self._start = None  # the clock runs while an epoch trains
        self._paused = False

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._level = model_ops.current_level(self.model)

    def _stop_clock(self):
        if self._start is not None:
            self.train_seconds += time.perf_counter() - self._start
            self._start = None

    # Evaluating on the validation data is not training time either (the
    # independent models the report compares with are not validated every
    # epoch): the clock stops while fit runs it, at the end of an epoch.
    def on_test_begin(self, logs=None):
        self._paused = self._start is not None
        self._stop_clock()

    def on_test_end(self, logs=None):
        if self._paused:
            self._start = time.perf_counter()
            self._paused = False

    def on_epoch_end(self, epoch, logs=None):
        # Saving is not training time: the clock stops before it.
        self._stop_clock()
        self.epochs += 1
        if logs and "examples" in logs:
            self.examples.append(int(logs["examples"]))
        if logs and "flops_saved" in logs:
            self.flops_saved.append(float(logs["flops_saved"]))
        level = model_ops.current_level(self.model)
        save(
            self.model,
            self.directory,
            {
                "level": level,
                # elsa_tf.fit counts each level's epochs from 0; a level that
                # has just finished leaves the next one at its start.
                "epoch_in_level": epoch + 1 if level == self._level else 0,
                "epochs": self.epochs,
                "train_seconds": self.train_seconds,
                "examples_per_epoch": self.examples,
                "flops_saved_per_epoch": self.flops_saved,
                # After the epoch's swap (the sieve calls back first).
                **({"sieve": self.sieve.state()} if self.sieve else {}),
            },
        )
