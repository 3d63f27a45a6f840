"""Data sieving inside `model.fit`: example ids, the partial set, the swaps.

`elsa_tf.sieving` holds SpFDE's rule; this module runs it in Keras:

* `DataSieve` is the configuration: the share held out, the interval, the
  seed.
* `SievingCallback(sieve).dataset(x, y, ...)` turns arrays, or a finite
  `tf.data.Dataset` of unbatched `(x, y)` examples, into a batched dataset
  of `(x, y, {EXAMPLE_ID: ids})`. Each example is numbered before any user
  map (augmentation) and its id rides along through it. A membership table
  (a bool `tf.Variable`) says which examples are in the partial set: arrays
  are gathered by the ids it lists, a dataset is filtered by it. Each
  epoch's iterator reads it afresh, so a swap changes which examples the
  next epoch trains on without rebuilding or retracing anything.
* During `fit`, the callback routes the model's training step through
  `sieved_train_step`: it strips the ids before the model sees the batch,
  and records whether each example's prediction was right from the
  predictions the step computes anyway (no second forward pass). Every
  `interval` epochs it ranks the partial set by forgetting events and swaps.

Example:

```python
sieving = elsa_tf.SievingCallback(elsa_tf.DataSieve(share=0.2, interval=5))
train = sieving.dataset(x, y, batch_size=32)
model.fit(train, epochs=10, callbacks=[sieving])
sieving.examples_per_epoch  # [80, 80, ...] for 100 examples
```
"""

from __future__ import annotations

import math
import types

import keras
import numpy as np
import tensorflow as tf

from elsa_tf import compiled_functions, sieving

# The key of the ids in a sieved batch `(x, y, {EXAMPLE_ID: ids})`. A dict,
# not a bare third element: Keras would take a bare tensor for sample
# weights, and train on ids as weights, where a dict fails loudly.
EXAMPLE_ID = "elsa_tf_example_id"

# Examples of a tf.data input filtered at once (one function call per chunk).
_FILTER_CHUNK = 1024


@keras.saving.register_keras_serializable(package="elsa_tf")
class DataSieve:
    """SpFDE's circular data sieving: what to hold out, and how often to swap.

    Args:
        share: the share of the training set held out of each epoch, in
            [0, 1). 0 sieves nothing.
        interval: epochs between swaps, at least 1.
        seed: seeds the initial removal, tie-breaks and queue shuffles.

    Raises:
        ValueError: for a share outside [0, 1), an interval below 1 or a
            negative seed.

    Example:

    ```python
    sieve = elsa_tf.DataSieve(share=0.2, interval=5, seed=0)
    assert elsa_tf.DataSieve.from_config(sieve.get_config()) == sieve
    ```
    """

    def __init__(
        self,
        share: float = sieving.DEFAULT_SHARE,
        interval: int = sieving.DEFAULT_INTERVAL,
        seed: int = 0,
    ):
        self.share = sieving.check_share(share)
        self.interval = sieving.check_interval(interval)
        self.seed = sieving.check_seed(seed)

    def get_config(self) -> dict:
        return {"share": self.share, "interval": self.interval, "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict) -> DataSieve:
        return cls(**config)

    def __eq__(self, other) -> bool:
        return isinstance(other, DataSieve) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.get_config().items())))

    def __repr__(self) -> str:
        return (
            f"DataSieve(share={self.share}, interval={self.interval}, seed={self.seed})"
        )


def _source(x, y):
    """The examples as given (`(x, y)` arrays, or a dataset), and their number.

    Raises:
        ValueError: for input that cannot carry stable example ids.
    """
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError(
                "With a tf.data.Dataset, the labels come from the dataset. "
                f"Received: y={type(y).__name__}"
            )
        cardinality = int(x.cardinality())
        if cardinality < 0:
            kind = (
                "infinite"
                if cardinality == tf.data.INFINITE_CARDINALITY
                else ("unknown")
            )
            raise ValueError(
                "Data sieving numbers the examples, so it needs a dataset of "
                f"known, finite length; this one's is {kind}. Pass arrays, or "
                "a finite dataset (drop `repeat()`, or add `.apply(tf.data."
                "experimental.assert_cardinality(n))` after a `filter`). "
                f"Received: cardinality={cardinality}"
            )
        spec = x.element_spec
        if not isinstance(spec, tuple) or len(spec) != 2:
            raise ValueError(
                "Data sieving needs a dataset of unbatched (x, y) examples. "
                f"Received: element_spec={spec!r}"
            )
        label = spec[1]
        if (
            isinstance(label, tf.TensorSpec)
            and label.shape.rank
            and (label.shape[0] is None)
        ):
            raise ValueError(
                "Data sieving needs unbatched examples (it batches itself); the "
                "labels have an unknown first dimension, as batches do. "
                f"Received: y spec={label!r}"
            )
        data = x
        num_examples = cardinality
    elif tf.nest.flatten(x) and all(
        isinstance(leaf, np.ndarray) for leaf in tf.nest.flatten(x)
    ):
        if y is None:
            raise ValueError(
                "Data sieving needs labels to tell right predictions from wrong "
                "ones. Received: y=None"
            )
        y = np.asarray(y)
        num_examples = len(tf.nest.flatten(x)[0])
        lengths = {len(leaf) for leaf in tf.nest.flatten(x)} | {len(y)}
        if len(lengths) != 1:
            raise ValueError(
                "x and y must hold as many examples. Received: lengths "
                f"{sorted(lengths)}"
            )
        data = (x, y)
    else:
        raise ValueError(
            "Data sieving needs input that can carry example ids: NumPy arrays "
            "or a finite tf.data.Dataset of (x, y) examples, not a Python "
            "generator or iterator, whose length and order are unknown. "
            f"Received: x of type {type(x).__name__}"
        )
    if num_examples < 1:
        raise ValueError(
            f"Data sieving needs at least one example. Received: {num_examples}"
        )
    return data, num_examples


def _correct(y, y_pred):
    """Whether each prediction names the true class (argmax of the scores).

    Raises:
        ValueError: for more than one output, or a single score per example.
    """
    if not isinstance(y_pred, tf.Tensor) and not hasattr(y_pred, "shape"):
        raise ValueError(
            "Data sieving supports models with a single output. Received: "
            f"y_pred of type {type(y_pred).__name__}"
        )
    y_pred = tf.convert_to_tensor(y_pred)
    if y_pred.shape.rank != 2 or y_pred.shape[-1] in (None, 1):
        raise ValueError(
            "Data sieving tells right from wrong by the argmax of class scores, "
            "so it needs predictions of shape (batch, classes) with classes > "
            f"1. Received: y_pred shape {y_pred.shape}"
        )
    predicted = tf.argmax(y_pred, axis=-1, output_type=tf.int64)
    y = tf.convert_to_tensor(y)
    if y.shape.rank == 2 and y.shape[-1] == y_pred.shape[-1]:
        label = tf.argmax(y, axis=-1, output_type=tf.int64)  # one-hot
    else:
        label = tf.cast(tf.reshape(y, [-1]), tf.int64)
    return tf.equal(predicted, label)


class _Recorder:
    """The in-graph twin of `sieving.ForgettingTracker`, in variables.

    Updated in place by id (scatters), so a step costs O(batch), not O(N).
    Flags are int32 0/1: scatters into bool variables are not supported on
    every device.
    """

    def __init__(self, num_examples: int):
        def variable(name):
            return tf.Variable(
                tf.zeros([num_examples], tf.int32), trainable=False, name=name
            )

        self.last_correct = variable("sieve_last_correct")
        self.forgetting = variable("sieve_forgetting")
        self.learned = variable("sieve_learned")
        self.seen = tf.Variable(
            tf.constant(0, tf.int64), trainable=False, name="sieve_seen"
        )

    def record(self, ids, correct):
        """Counts forgetting events for `ids` (each once per batch)."""
        ids = tf.cast(tf.reshape(ids, [-1]), tf.int64)
        index = ids[:, None]
        now = tf.cast(correct, tf.int32)
        was = tf.gather(self.last_correct, ids)
        self.forgetting.scatter_nd_add(index, was * (1 - now))
        self.last_correct.scatter_nd_update(index, now)
        learned = tf.maximum(tf.gather(self.learned, ids), now)
        self.learned.scatter_nd_update(index, learned)
        self.seen.assign_add(tf.size(ids, out_type=tf.int64))

    def tracker(self) -> sieving.ForgettingTracker:
        return sieving.ForgettingTracker(
            last_correct=self.last_correct.numpy() == 1,
            forgetting=self.forgetting.numpy().astype(np.int64),
            learned=self.learned.numpy() == 1,
        )

    def load(self, tracker: sieving.ForgettingTracker) -> None:
        self.last_correct.assign(tracker.last_correct.astype(np.int32))
        self.forgetting.assign(tracker.forgetting.astype(np.int32))
        self.learned.assign(tracker.learned.astype(np.int32))


def split_ids(data):
    """`(x, y)` and the ids of a sieved batch `(x, y, {EXAMPLE_ID: ids})`.

    Args:
        data: a batch as the dataset of `SievingCallback.dataset` yields it.

    Returns:
        `((x, y), ids)`.

    Raises:
        ValueError: if the batch carries no ids.
    """
    if (
        isinstance(data, (tuple, list))
        and len(data) == 3
        and isinstance(data[2], dict)
        and set(data[2]) == {EXAMPLE_ID}
    ):
        return (data[0], data[1]), data[2][EXAMPLE_ID]
    raise ValueError(
        "The sieving callback needs the batches of its own dataset, "
        f"`(x, y, {{{EXAMPLE_ID!r}: ids}})`: train on "
        "`SievingCallback.dataset(...)`. Received: a batch of structure "
        f"{tf.nest.map_structure(lambda t: getattr(t, 'shape', t), data)}"
    )


def sieved_train_step(model, data, recorder: _Recorder, base_train_step=None):
    """One training step on a sieved batch, recording each example's result.

    The ids are split off before the model sees the batch; the predictions
    the step computes for its loss are compared with the labels on their way
    to `compute_metrics`, so no second forward pass runs.

    Args:
        model: the Keras model being trained.
        data: a batch `(x, y, {EXAMPLE_ID: ids})`.
        recorder: the variables the results go to.
        base_train_step: the step to run on `(x, y)`; the model's class's
            `train_step` when None.

    Returns:
        What the base step returns (the logs).
    """
    batch, ids = split_ids(data)
    if base_train_step is None:
        base_train_step = types.MethodType(type(model).train_step, model)
    base_metrics = model.compute_metrics

    def compute_metrics(x, y, y_pred, sample_weight=None):
        recorder.record(ids, _correct(y, y_pred))
        return base_metrics(x, y, y_pred, sample_weight=sample_weight)

    # Only while this step is traced (or, eagerly, runs).
    previous = vars(model).get("compute_metrics")
    object.__setattr__(model, "compute_metrics", compute_metrics)
    try:
        return base_train_step(batch)
    finally:
        if previous is None:
            object.__delattr__(model, "compute_metrics")
        else:
            object.__setattr__(model, "compute_metrics", previous)


@keras.saving.register_keras_serializable(package="elsa_tf")
class SievingCallback(keras.callbacks.Callback):
    """Trains on SpFDE's partial set, swapping examples every few epochs.

    Build the training data with `dataset(...)`, then pass both to `fit`.
    The sieve's state (queue, forgetting counts, epochs) lives in the callback
    and carries over from one `fit` call to the next, so with `elsa_tf.fit`
    (one `model.fit` per level) the queue keeps turning across levels and
    swaps stay `interval` epochs apart over the whole run.

    While `fit` runs, the model's `train_step` is wrapped by an instance
    attribute (`sieved_train_step`), removed again when `fit` ends. Only
    single-replica training is supported.

    Args:
        sieve: a `DataSieve`, or None for `DataSieve()`.
        state: None, or what `state()` returned in an earlier run: the next
            `dataset()` carries on from it instead of starting afresh.

    Attributes:
        examples_per_epoch: examples trained on in each epoch so far, one
            entry per epoch of every `fit` call. Each epoch's count is also
            logged as `"examples"` (in `History.history["examples"]`).

    Example:

    ```python
    sieving = elsa_tf.SievingCallback(elsa_tf.DataSieve(share=0.2, interval=5))
    train = sieving.dataset(x, y, batch_size=32)
    elsa_tf.fit(model, train, epochs_per_level=3, optimizer="adam", loss=loss,
                callbacks=[sieving])
    ```
    """

    def __init__(self, sieve: DataSieve | None = None, state: dict | None = None):
        super().__init__()
        if sieve is None:
            sieve = DataSieve()
        if not isinstance(sieve, DataSieve):
            raise TypeError(f"Expected a DataSieve. Received: sieve={sieve!r}")
        if state is not None and not isinstance(state, dict):
            raise TypeError(
                f"state must be a dict from SievingCallback.state(). Received: "
                f"state={state!r}"
            )
        self.sieve = sieve
        self.examples_per_epoch: list[int] = []
        self._queue: sieving.SieveQueue | None = None
        self._resume_state = state  # taken up by the next `dataset()`
        # The sieved step of the model being trained: the same one for every
        # fit, so that its traces are kept (`elsa_tf.compiled_functions`).
        self._train_step = None

    # --- data ---------------------------------------------------------------

    def dataset(
        self,
        x,
        y=None,
        *,
        batch_size: int = 32,
        map_fn=None,
        shuffle: bool = True,
    ) -> tf.data.Dataset:
        """The training data, numbered and sieved: pass it to `fit`.

        Starts the sieve afresh: the initial share is held out, the
        forgetting counts are zero and the epoch count restarts; or, once,
        from the `state` the callback was made with.

        The model must have a single output of class scores, shape
        `(batch, classes)` with `classes > 1` (logits or probabilities: a
        prediction is right when its argmax is the label). Train without
        `steps_per_epoch`, `sample_weight` or `class_weight`, and evaluate on
        data of your own (only training steps strip the ids).

        Args:
            x: NumPy inputs (an array, or a tuple or dict of arrays for a
                model with several inputs), with `y`; or a finite
                `tf.data.Dataset` of unbatched `(x, y)` examples that yields
                them in the same order every time it is iterated (do not
                shuffle it: `shuffle=True` does, after the ids are attached).
            y: labels (class indices or one-hot) for array `x`; None for a
                dataset.
            batch_size: examples per batch.
            map_fn: a function `(x, y) -> (x, y)` run on each example of the
                partial set in `tf.data` (augmentation); the example's id
                travels alongside, and held-out examples are not mapped.
            shuffle: whether to shuffle the partial set every epoch. Arrays
                are shuffled by id (by the seed and the epoch); a dataset
                through a shuffle buffer that holds the whole partial set.

        Returns:
            A dataset of batches `(x, y, {EXAMPLE_ID: ids})`, of known length:
            `ceil(kept / batch_size)` batches for `kept` examples in the
            partial set.

        Raises:
            ValueError: for input that cannot carry example ids (a generator,
                a dataset of unknown or infinite length, batched examples,
                arrays without labels), a `map_fn` that does not return a pair,
                or a `batch_size` below 1.
        """
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int)
            or (batch_size < 1)
        ):
            raise ValueError(
                f"batch_size must be a positive int. Received: batch_size="
                f"{batch_size!r}"
            )
        source, num_examples = _source(x, y)
        self._queue = sieving.initial_queue(
            num_examples, self.sieve.share, self.sieve.seed
        )
        self._recorder = _Recorder(num_examples)
        self._train_step = None
        self._member = tf.Variable(
            self._queue.members(), trainable=False, name="sieve_members"
        )
        self._epoch = tf.Variable(
            tf.constant(0, tf.int64), trainable=False, name="sieve_epoch"
        )
        self.examples_per_epoch = []
        if self._resume_state is not None:
            self._restore(self._resume_state, num_examples)
            self._resume_state = None
        kept = num_examples - self._queue.queue.size
        # Each epoch's iterator reads the membership variable when it starts,
        # so a swap at an epoch's end changes the next epoch's examples with
        # nothing rebuilt or retraced.
        if isinstance(source, tf.data.Dataset):
            data = self._dataset_examples(source, num_examples, kept, shuffle)
            if map_fn is not None:
                data = _map_pairs(data, lambda xy, i: (map_fn(*xy), i))
            data = data.batch(batch_size)
        else:
            ids = self._epoch_ids(shuffle)
            tensors = tf.nest.map_structure(tf.convert_to_tensor, source)

            def take(i):
                return tf.nest.map_structure(lambda t: tf.gather(t, i), tensors)

            if map_fn is None:
                # Gathered a batch at a time: costs what slicing arrays does.
                data = ids.batch(batch_size).map(lambda i: (take(i), i))
            else:
                data = _map_pairs(ids, lambda i: (map_fn(*take(i)), i))
                data = data.batch(batch_size)
        data = data.map(lambda xy, i: (xy[0], xy[1], {EXAMPLE_ID: i}))
        # The filter hides the length from Keras (and from LevelScheduler,
        # which needs the steps per epoch); every epoch has `kept` examples.
        steps = math.ceil(kept / batch_size)
        self._steps = steps
        data = data.apply(tf.data.experimental.assert_cardinality(steps))
        return data.prefetch(tf.data.AUTOTUNE)

    def _dataset_examples(self, source, num_examples, kept, shuffle):
        """`((x, y), id)` of the partial set, from a dataset read in order."""
        member = self._member

        def keep(xy, i):
            mask = tf.gather(member, i)
            return tf.nest.map_structure(lambda t: tf.boolean_mask(t, mask), (xy, i))

        numbered = tf.data.Dataset.zip((source, tf.data.Dataset.range(num_examples)))
        # Filtered a chunk at a time: `filter` would call a function for every
        # example, which cost 4 times an epoch of a small MLP (50k examples).
        data = numbered.batch(_FILTER_CHUNK).map(keep).unbatch()
        if shuffle:
            data = data.shuffle(kept, seed=self.sieve.seed)
        return data

    def _epoch_ids(self, shuffle: bool) -> tf.data.Dataset:
        """The ids of the partial set, shuffled by (seed, epoch) if asked."""
        member, epoch, seed = self._member, self._epoch, self.sieve.seed

        def epoch_ids(_):
            ids = tf.where(member)[:, 0]
            if shuffle:
                ids = tf.random.experimental.stateless_shuffle(
                    ids, seed=tf.stack([tf.constant(seed, tf.int64), epoch])
                )
            return tf.data.Dataset.from_tensor_slices(ids)

        return tf.data.Dataset.range(1).flat_map(epoch_ids)

    # --- state --------------------------------------------------------------

    def state(self) -> dict:
        """The sieve's state as JSON-ready values, to resume a run from.

        The held-out queue, the forgetting counts of the current interval
        and the epochs trained. `SievingCallback(sieve, state=...)` carries
        on from it: its `dataset()` starts there instead of afresh (as
        `elsa-train --resume` does from its checkpoint).
        """
        self._check_started()
        tracker = self.tracker
        return {
            "queue": self._queue.to_dict(),
            "last_correct": tracker.last_correct.astype(int).tolist(),
            "forgetting": tracker.forgetting.astype(int).tolist(),
            "learned": tracker.learned.astype(int).tolist(),
            "epochs": int(self._epoch.numpy()),
        }

    def carry_on(self) -> None:
        """Makes the next `dataset()` carry on from the sieve's state now,
        instead of starting afresh (as `elsa_tf.fit` does when it is handed
        a callback that has already trained)."""
        if self._queue is not None and self._resume_state is None:
            self._resume_state = self.state()

    def _restore(self, state: dict, num_examples: int) -> None:
        try:
            queue = sieving.SieveQueue.from_dict(state["queue"])
            tracker = sieving.ForgettingTracker(
                last_correct=np.asarray(state["last_correct"]) == 1,
                forgetting=np.asarray(state["forgetting"], np.int64),
                learned=np.asarray(state["learned"]) == 1,
            )
            epochs = int(state["epochs"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                "state must be a dict from SievingCallback.state(). Received: "
                f"a dict with keys {sorted(state)} ({e})"
            ) from e
        sizes = {
            queue.num_examples,
            tracker.num_examples,
            tracker.forgetting.shape[0],
            tracker.learned.shape[0],
        }
        if sizes != {num_examples}:
            raise ValueError(
                f"The saved sieve state is for {sorted(sizes)} examples, but the "
                f"training data has {num_examples}. Received: state for "
                f"num_examples={queue.num_examples}"
            )
        ids = np.concatenate([queue.queue, queue.pending])
        if ids.size and (ids.min() < 0 or ids.max() >= num_examples):
            raise ValueError(
                f"The saved sieve queue holds ids outside [0, {num_examples}). "
                f"Received: ids from {ids.min()} to {ids.max()}"
            )
        expected = (self.sieve.seed, sieving.swap_size(num_examples, self.sieve.share))
        if (queue.seed, queue.swap_size) != expected or queue.queue.size != (
            sieving.queue_size(num_examples, self.sieve.share)
        ):
            raise ValueError(
                f"The saved sieve state was made with other settings than "
                f"{self.sieve!r} (seed and share). Received: state with "
                f"seed={queue.seed}, {queue.queue.size} examples held out"
            )
        self._queue = queue
        self._member.assign(queue.members())
        self._recorder.load(tracker)
        self._epoch.assign(epochs)

    def _check_started(self):
        if self._queue is None:
            raise ValueError(
                "The sieve has no data yet: build the training data with "
                "`SievingCallback.dataset(x, y, ...)` and pass that to fit. "
                "Received: no call to dataset()"
            )

    @property
    def queue(self) -> sieving.SieveQueue:
        """The held-out examples, head first."""
        self._check_started()
        return self._queue

    @property
    def tracker(self) -> sieving.ForgettingTracker:
        """Correctness and forgetting events recorded in this interval."""
        self._check_started()
        return self._recorder.tracker()

    def swap(self) -> None:
        """Swaps now: the interval's easiest examples out, the queue's head in."""
        self._check_started()
        before = self._queue
        self._queue = sieving.sieve_step(before, sieving.difficulty(self.tracker))
        back = sieving.returned(before, self._queue)
        self._recorder.load(sieving.start_interval(self.tracker, back))
        self._member.assign(self._queue.members())

    # --- callback -----------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._check_started()
        model = self.model
        replicas = model.distribute_strategy.num_replicas_in_sync
        if replicas != 1:
            raise ValueError(
                "Data sieving records results in one replica's variables; it "
                f"does not support distributed training yet. Received: "
                f"{replicas} replicas"
            )
        steps = (self.params or {}).get("steps")
        if steps is not None and steps != self._steps:
            # Keras would then carry an epoch's iterator into the next one,
            # read before a swap: give every epoch one pass of the partial set.
            raise ValueError(
                f"With data sieving an epoch is one pass over the partial set, "
                f"{self._steps} batches; leave steps_per_epoch unset. Received: "
                f"steps_per_epoch={steps}"
            )
        _uninstall(model)  # one left by a fit that was interrupted
        if self._train_step is None or self._train_step.model is not model:
            self._train_step = _sieved_step(model, self._recorder)
        _install(model, self._train_step)
        # fit made its train function before calling back: put one in place
        # around the sieved step, traced once for every fit of this callback
        # at the same level state (as LevelScheduler does after a level).
        compiled_functions.switch(model, in_fit=True)

    def on_train_end(self, logs=None):
        _uninstall(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        self._recorder.seen.assign(0)

    def on_epoch_end(self, epoch, logs=None):
        examples = int(self._recorder.seen.numpy())
        self.examples_per_epoch.append(examples)
        if logs is not None:
            logs["examples"] = examples  # into the History and the progress bar
        # Epochs of every fit call so far: fit's own index restarts at 0 with
        # each call (each level, under elsa_tf.fit).
        epochs = int(self._epoch.assign_add(1).numpy())
        if epochs % self.sieve.interval == 0:
            self.swap()

    def get_config(self) -> dict:
        return {"sieve": keras.saving.serialize_keras_object(self.sieve)}

    @classmethod
    def from_config(cls, config: dict) -> SievingCallback:
        return cls(keras.saving.deserialize_keras_object(config["sieve"]))


def _sieved_step(model, recorder: _Recorder):
    """`model`'s training step routed through `sieved_train_step`."""
    previous = vars(model).get("train_step")
    base = previous or types.MethodType(type(model).train_step, model)

    def train_step(data):
        try:
            return sieved_train_step(model, data, recorder, base)
        except Exception:
            # A failed trace ends fit without `on_train_end`: put the model's
            # own step back before the error goes up.
            _uninstall(model)
            raise

    train_step.sieving_previous = previous
    train_step.model = model
    return train_step


def _install(model, train_step) -> None:
    """Puts a step made by `_sieved_step` in place of `model`'s own."""
    object.__setattr__(model, "train_step", train_step)


def _uninstall(model) -> None:
    """Undoes `_install`, if it is in place, and drops the traced step."""
    step = vars(model).get("train_step")
    if not hasattr(step, "sieving_previous"):
        return
    if step.sieving_previous is None:
        object.__delattr__(model, "train_step")
    else:
        object.__setattr__(model, "train_step", step.sieving_previous)
    compiled_functions.switch(model)


def _map_pairs(data: tf.data.Dataset, fn) -> tf.data.Dataset:
    """`data.map(fn)`, where `fn` must give `((x, y), id)`: map_fn's pair."""
    mapped = data.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    out = mapped.element_spec[0]
    if not isinstance(out, tuple) or len(out) != 2:
        raise ValueError(
            f"map_fn must return an (x, y) pair. Received: map_fn returning {out!r}"
        )
    return mapped
