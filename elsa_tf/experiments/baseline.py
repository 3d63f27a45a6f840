"""The independent baselines: one separately pruned model per sparsity.

`train_independent` prunes tf_keras models with tfmot (per-layer ranking, its
only mode); `train_independent_elsa` trains single-level models with elsa_tf
itself (the paper's own comparison: same sparsifier, selection and schedule
as the ELSA run, so the two differ only in nesting).

What a user would do without ELSA: for every sparsity, build the model afresh,
prune it with tfmot's `prune_low_magnitude` while it trains, `strip_pruning`,
and convert it to TFLite. Each model gets what one ELSA level gets: the same
number of epochs, a fresh optimizer from the same factory, and the same tfmot
schedule (`LevelSchedule.build(target, steps)`) over its own steps, so the
comparison differs only in ELSA's nesting.

tfmot prunes Keras 2 models, so the models are built with `tf_keras`; the
optimizer factory comes from `optimizers.factory(..., backend="tf_keras")`.
tfmot is imported through `elsa_tf.schedules`, which keeps it from switching
the process's `tf.keras` to Keras 2 for later imports; Keras 3 training in the
same process is unaffected (tested).

Which weights are pruned is tfmot's choice, not elsa_tf's: `prune_low_magnitude`
on a whole model prunes the kernels its registry lists (Dense, Conv1D/2D/3D and
their transposes, Embedding, the pointwise kernel of SeparableConv, the
projections of MultiHeadAttention), each layer to the target on its own. It
leaves `DepthwiseConv2D` dense, where `elsa_tf.embed` prunes depthwise kernels
too; and it raises for a layer its registry does not know.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
from collections.abc import Callable, Iterable

import numpy as np

from elsa_tf import batch_norm, export, schedules, sparsifiers
from elsa_tf.callbacks import check_positive_int
from elsa_tf.lite import runtime

# Probe inputs on which a sparse TFLite file must match the dense one, as in
# `elsa_tf.export`.
_PROBE_SAMPLES = 16


def _check_sparsities(sparsities) -> list[float]:
    try:
        values = [] if isinstance(sparsities, (str, bytes)) else list(sparsities)
    except TypeError:
        values = []
    if not values:
        raise ValueError(
            "sparsities must be a non-empty list of numbers in [0, 1). "
            f"Received: sparsities={sparsities!r}"
        )
    for s in values:
        if (
            isinstance(s, bool)
            or not isinstance(s, (int, float, np.floating, np.integer))
            or not 0.0 <= s < 1.0
        ):
            raise ValueError(
                "Each sparsity must be a number in [0, 1) (0 trains a dense "
                f"model). Received: sparsities={sparsities!r}"
            )
    return [float(s) for s in values]


def _steps_per_epoch(train, num_train: int, batch_size: int) -> int:
    """Batches in one epoch of `train`, as `fit` will count them."""
    cardinality = int(train.cardinality())
    if cardinality > 0:
        return cardinality
    return max(math.ceil(num_train / batch_size), 1)


def _pruned_weights(model) -> list:
    """The variables tfmot prunes in a model wrapped by `prune_low_magnitude`.

    The wrapper class is not exported by tfmot; its `pruning_vars` attribute,
    `(weight, mask, threshold)` per pruned weight, is what its callbacks use.
    """
    return [
        weight
        for layer in model.submodules
        for weight, _, _ in getattr(layer, "pruning_vars", ())
    ]


def _sparsity(weights) -> tuple[float, int]:
    """Fraction of exact zeros over `weights`, and their number of elements."""
    size = sum(int(np.prod(w.shape)) for w in weights)
    zeros = sum(int(np.sum(w.numpy() == 0)) for w in weights)
    return (zeros / size if size else 0.0), size


def _convert(model, sparse: bool) -> bytes:
    """Float32 TFLite bytes of a tf_keras model (sparse-encoded if asked).

    Converted here, from the Keras model, rather than by `elsa_tf.export`,
    which converts Keras 3 models and may change how.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if sparse:
        converter.optimizations = {tf.lite.Optimize.EXPERIMENTAL_SPARSITY}
    with contextlib.redirect_stdout(io.StringIO()):
        return bytes(converter.convert())


def _to_tflite(model, probe: np.ndarray) -> tuple[bytes, bool]:
    """Float32 TFLite bytes and whether sparse, by `elsa_tf.export`'s rule:
    sparse encoding when it is smaller and gives the dense file's outputs
    (it runs, under the runtime's default delegates, and matches)."""
    dense = _convert(model, False)
    sparse = _convert(model, True)
    if len(sparse) < len(dense):
        try:
            same = np.allclose(
                _predict(sparse, probe), _predict(dense, probe), rtol=1e-4, atol=1e-5
            )
        except (RuntimeError, ValueError):  # what the runtimes raise
            same = False
        if same:
            return sparse, True
    _predict(dense, probe)  # every file must run
    return dense, False


def _predict(content: bytes, probe: np.ndarray) -> np.ndarray:
    interpreter = runtime.interpreter(content, num_threads=1)
    return np.concatenate(
        [np.asarray(runtime.predict(interpreter, x[None])) for x in probe]
    )


def train_independent(
    build: Callable[[], object],
    dataset,
    sparsities: Iterable[float],
    *,
    epochs: int,
    batch_size: int,
    optimizer: Callable[[], object],
    schedule: schedules.LevelSchedule,
    seed: int,
    augment: bool = True,
    recalibration_data=None,
    workdir: str | None = None,
    verbose: int = 0,
    on_start: Callable[[int, float], None] | None = None,
) -> list[dict]:
    """Trains one tfmot-pruned tf_keras model per sparsity, from scratch.

    For each sparsity in turn: seed with `tf_keras.utils.set_random_seed(seed)`
    (Python, numpy and TensorFlow's global generators, so every model starts
    from the same initial weights and sees the same batches), `build()` the
    model, wrap it with `prune_low_magnitude(model, schedule.build(target,
    epochs * steps_per_epoch))` (none at sparsity 0: a plain dense model),
    train `epochs` epochs with `optimizer()` and tfmot's `UpdatePruningStep`,
    `strip_pruning`, evaluate on the test split and convert to TFLite. The
    process's global generators are left seeded: seed again before training
    anything else that should not depend on the baseline having run.

    Args:
        build: makes a fresh, uncompiled `tf_keras.Model` that outputs logits,
            e.g. `lambda: zoo.build(name, shape, classes, backend="tf_keras")`.
        dataset: an `elsa_tf.experiments.datasets.Dataset`, or any object with
            its `train(batch_size, *, seed, augment)`, `test(batch_size)` and
            `num_train`.
        sparsities: one target sparsity per model, each in [0, 1); the list
            index is the reported `level`, so pass ELSA's sparsities in ELSA's
            order to line the rows up.
        epochs: epochs per model (ELSA's `epochs_per_level`).
        batch_size: batch size for training and evaluation.
        optimizer: zero-argument factory of tf_keras optimizers, e.g.
            `optimizers.factory("adam", 1e-3, backend="tf_keras")`.
        schedule: the `LevelSchedule` (or anything `elsa_tf.schedules.get`
            accepts) that ELSA uses inside each level.
        seed: seeds the initial weights and the order of the batches.
        augment: passed to `dataset.train`.
        recalibration_data: training inputs, not augmented: when given, each
            trained model's BatchNormalization statistics are re-estimated on
            them (`elsa_tf.recalibrate_batch_norm`), as ELSA does at the end
            of each level; counted in `train_seconds`.
        workdir: when given, the TFLite files are written to
            `workdir/baseline/level{k}_sparsity{s:.2f}.tflite`.
        verbose: passed to `fit`.
        on_start: called as `on_start(level, target)` before each model trains
            (the training program prints a header).

    Returns:
        One dict per sparsity: `level`, `target_sparsity`, `achieved_sparsity`
        (fraction of exact zeros over the weights tfmot prunes),
        `prunable_params` (their number), `accuracy` (top-1 on the test
        split), `train_seconds` (wall time of `fit`), `tflite_bytes`
        (float32; sparse encoding when smaller and exact, as
        `elsa_tf.export`), `sparse_encoding`, and `tflite_path` when
        `workdir` is given.

    Raises:
        ValueError: for empty sparsities or one outside [0, 1), or epochs or
            batch_size that is not a positive int.
        TypeError: when `build` or `optimizer` is not callable, or returns
            something other than a tf_keras model or optimizer.

    Example:

    ```python
    rows = train_independent(
        lambda: zoo.build("cnn", data.input_shape, data.num_classes,
                          backend="tf_keras"),
        data, [0.9, 0.5, 0.0], epochs=5, batch_size=128,
        optimizer=optimizers.factory("adam", 1e-3, backend="tf_keras"),
        schedule=elsa_tf.LevelSchedule(), seed=0)
    ```
    """
    sparsities = _check_sparsities(sparsities)
    epochs = check_positive_int("epochs", epochs)
    batch_size = check_positive_int("batch_size", batch_size)
    for name, value in (("build", build), ("optimizer", optimizer)):
        if not callable(value):
            raise TypeError(
                f"{name} must be a zero-argument callable. Received: {name}={value!r}"
            )
    schedule = schedules.get(schedule)
    out_dir = None
    if workdir is not None:
        out_dir = os.path.join(os.fspath(workdir), "baseline")
        os.makedirs(out_dir, exist_ok=True)
    return [
        _train_one(
            level,
            target,
            build=build,
            dataset=dataset,
            epochs=epochs,
            batch_size=batch_size,
            optimizer=optimizer,
            schedule=schedule,
            seed=seed,
            augment=augment,
            recalibration_data=recalibration_data,
            out_dir=out_dir,
            verbose=verbose,
            on_start=on_start,
        )
        for level, target in enumerate(sparsities)
    ]


def _train_one(
    level: int,
    target: float,
    *,
    build,
    dataset,
    epochs,
    batch_size,
    optimizer,
    schedule,
    seed,
    augment,
    recalibration_data,
    out_dir,
    verbose,
    on_start,
) -> dict:
    sparsity = schedules._tfmot_sparsity()  # Before tf_keras: see the module doc.
    import tf_keras

    if on_start is not None:
        on_start(level, target)

    tf_keras.utils.set_random_seed(seed)
    model = build()
    if not isinstance(model, tf_keras.Model):
        raise TypeError(
            "build must return a tf_keras.Model (tfmot prunes Keras 2 models; "
            'zoo.build takes backend="tf_keras"). '
            f"Received: {type(model).__module__}.{type(model).__name__}"
        )
    train = dataset.train(batch_size, seed=seed, augment=augment)
    callbacks = []
    if target > 0:
        steps = epochs * _steps_per_epoch(train, dataset.num_train, batch_size)
        model = sparsity.prune_low_magnitude(
            model, pruning_schedule=schedule.build(target, steps)
        )
        callbacks.append(sparsity.UpdatePruningStep())
    opt = optimizer()
    if not isinstance(
        opt, (tf_keras.optimizers.Optimizer, tf_keras.optimizers.legacy.Optimizer)
    ):
        raise TypeError(
            "optimizer must return a tf_keras optimizer (optimizers.factory(..., "
            'backend="tf_keras")). '
            f"Received: {type(opt).__module__}.{type(opt).__name__}"
        )
    loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=opt, loss=loss, metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(train, epochs=epochs, callbacks=callbacks, verbose=verbose)
    train_seconds = time.perf_counter() - start

    if target > 0:
        pruned = _pruned_weights(model)
        model = sparsity.strip_pruning(model)  # Keeps the same layer objects.
    else:
        # The weights tfmot would prune: wrapping shares the model's variables.
        pruned = _pruned_weights(sparsity.prune_low_magnitude(model))
    if recalibration_data is not None:
        start = time.perf_counter()
        batch_norm.recalibrate_batch_norm(model, recalibration_data)
        train_seconds += time.perf_counter() - start
    achieved, size = _sparsity(pruned)
    model.compile(loss=loss, metrics=["accuracy"])
    accuracy = model.evaluate(dataset.test(batch_size), verbose=0, return_dict=True)
    probe = next(iter(dataset.test(_PROBE_SAMPLES)))[0]
    content, sparse = _to_tflite(model, np.asarray(probe, np.float32))
    file_name = export.level_file_name(level, target)
    row = {
        "level": level,
        "target_sparsity": target,
        "achieved_sparsity": achieved,
        "prunable_params": size,
        "accuracy": float(accuracy["accuracy"]),
        "train_seconds": train_seconds,
        "tflite_bytes": len(content),
        "sparse_encoding": sparse,
    }
    if out_dir is not None:
        path = os.path.join(out_dir, file_name)
        with open(path, "wb") as f:
            f.write(content)
        row["tflite_path"] = path
    return row


def train_independent_elsa(
    build: Callable[[], object],
    dataset,
    sparsities: Iterable[float],
    *,
    epochs: int,
    batch_size: int,
    optimizer: Callable[[], object],
    schedule: schedules.LevelSchedule,
    seed: int,
    sparsifier: str = "gradual_magnitude",
    selection: str = sparsifiers.DEFAULT_SELECTION,
    granularity: str = "weight",
    shared: str | None = None,
    augment: bool = True,
    recalibration_data=None,
    workdir: str | None = None,
    verbose: int = 0,
    on_start: Callable[[int, float], None] | None = None,
) -> list[dict]:
    """Trains one single-level elsa_tf model per sparsity, from scratch.

    The paper's comparison: for each sparsity, seed with
    `keras.utils.set_random_seed(seed)` (the same initial weights and batch
    order as the ELSA run), `build()` a Keras 3 model, `elsa_tf.embed` it with
    that one sparsity and ELSA's `sparsifier`, `selection`, `granularity`,
    `shared` and `schedule`, and train it with `elsa_tf.fit` for `epochs`
    epochs. Evaluated and exported (float32, `elsa_tf.export_tflite`) as an
    ELSA level is.

    Args:
        build: makes a fresh, uncompiled Keras 3 model that outputs logits.
        dataset, sparsities, epochs, batch_size, seed, augment,
            recalibration_data, verbose, on_start: as for `train_independent`.
        optimizer: zero-argument factory of Keras 3 optimizers.
        schedule: the `LevelSchedule` of the ELSA run.
        sparsifier, selection, granularity, shared: as for `elsa_tf.embed`.
        workdir: when given, each model's export goes to
            `workdir/baseline_elsa/level{k}/`.

    Returns:
        One dict per sparsity, with the keys of `train_independent`'s rows
        (`prunable_params` counts elsa_tf's prunable weights).
    """
    import keras

    import elsa_tf

    sparsities = _check_sparsities(sparsities)
    epochs = check_positive_int("epochs", epochs)
    batch_size = check_positive_int("batch_size", batch_size)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    out_root = None if workdir is None else os.path.join(workdir, "baseline_elsa")
    test_x, test_y = dataset.test_arrays()
    rows = []
    for level, target in enumerate(sparsities):
        if on_start is not None:
            on_start(level, target)
        keras.utils.set_random_seed(seed)
        model = elsa_tf.embed(
            build(),
            [target],
            sparsifier=sparsifier,
            selection=selection,
            granularity=granularity,
            shared=shared,
            schedule=schedule,
        )
        start = time.perf_counter()
        elsa_tf.fit(
            model,
            dataset.train(batch_size, seed=seed, augment=augment),
            epochs_per_level=epochs,
            optimizer=optimizer,
            loss=loss,
            metrics=["accuracy"],
            recalibration_data=recalibration_data,
            shuffle=False,  # the pipeline shuffles, seeded
            verbose=verbose,
        )
        train_seconds = time.perf_counter() - start
        summary = elsa_tf.summary(model)[0]
        extracted = elsa_tf.extract(model, 0)
        logits = extracted.predict(test_x, batch_size=500, verbose=0)
        accuracy = float(np.mean(logits.argmax(axis=-1) == test_y))
        row = {
            "level": level,
            "target_sparsity": target,
            "achieved_sparsity": float(summary["achieved_sparsity"]),
            "prunable_params": int(summary["total"]),
            "accuracy": accuracy,
            "train_seconds": train_seconds,
        }
        if out_root is not None:
            out_dir = os.path.join(out_root, f"level{level}")
            manifest = elsa_tf.export_tflite(
                model, out_dir, bundle=False, overwrite=True, sparse_encoding=True
            )
            (file_row,) = manifest["levels"]
            row["tflite_bytes"] = int(file_row["bytes"])
            row["sparse_encoding"] = bool(file_row.get("sparse_encoding"))
            row["tflite_path"] = os.path.join(out_dir, file_row["file"])
        else:
            row["tflite_bytes"] = None
        rows.append(row)
    return rows
