"""`train_and_evaluate(config, workdir)`: one training run, start to report.

It embeds the zoo model, trains every level with `elsa_tf.fit` (a checkpoint
after every epoch; `resume=True` continues from the last one, mid-level
included), evaluates every level, exports them to TFLite and times them with
the TFLite runtime, trains the independent tfmot baseline when asked, and
writes `report.md`, `report.json` and `report.png` into `workdir`.

Layout of `workdir`: `config.json` (the resolved configuration),
`checkpoints/`, `tensorboard/level_<k>/`, `model.keras` (the trained embedded
model), `tflite/` (the export and its manifest), `baseline/` (the baseline's
TFLite files) and the three report files.
"""

from __future__ import annotations

import os
import shutil

import keras
import numpy as np
import tensorflow as tf

import elsa_tf
from elsa_tf.experiments import checkpoint, datasets, optimizers, progress, zoo
from elsa_tf.experiments import report as report_lib
from elsa_tf.experiments.config import Config

CONFIG_FILE = "config.json"
# Outputs of a previous run that a fresh (not resumed) run replaces.
_RUN_OUTPUTS = ("checkpoints", "tensorboard", "tflite", "baseline", "model.keras")
# Latency is the median of this many single-example invokes, on one thread:
# what a small device does, and steadier than the runtime's thread pool.
_LATENCY_REPEATS = 50
# BatchNormalization statistics are re-estimated on this many training
# examples: enough for a stable average, a few seconds even for ResNet-20.
_RECALIBRATION_EXAMPLES = 2048
_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _recalibration_data(config: Config, data):
    if not config.recalibrate_bn:
        return None
    return data.train_arrays(limit=min(_RECALIBRATION_EXAMPLES, data.num_train))[0]


def _strategy(distribution: str):
    if distribution == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _prepare_workdir(config: Config, workdir: str, resume: bool) -> None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    if resume and os.path.exists(path):
        saved = Config.load(path)
        changed = {
            k: (v, getattr(config, k))
            for k, v in saved.to_dict().items()
            if v != config.to_dict()[k]
        }
        if changed:
            details = ", ".join(
                f"{k}={new!r} (the run has {old!r})"
                for k, (old, new) in changed.items()
            )
            raise ValueError(
                f"Cannot resume the run in {workdir} with other settings. "
                f"Received: {details}"
            )
    elif not resume:
        for name in _RUN_OUTPUTS:
            target = os.path.join(workdir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
    config.save(path)


def _build(config: Config, data) -> keras.Model:
    base = zoo.build(
        config.model, data.input_shape, data.num_classes, width=config.width
    )
    return elsa_tf.embed(
        base,
        config.sparsities,
        selection=config.selection,
        shared=config.shared,
        schedule=elsa_tf.LevelSchedule(config.schedule),
    )


def train(
    config: Config, workdir: str, data, *, resume: bool, verbose, recalibration_data
) -> tuple:
    """Trains (or finishes training) every level; returns (model, seconds)."""
    directory = os.path.join(workdir, "checkpoints")
    state = checkpoint.latest(directory) if resume else None
    num_levels = len(config.sparsities)
    strategy = _strategy(config.distribution)
    with strategy.scope():
        if state is None:
            model = _build(config, data)
            state = {"level": 0, "epoch_in_level": 0, "epochs": 0, "train_seconds": 0}
        else:
            model = checkpoint.load(state)
            if verbose:
                print(
                    f"Resuming from {state['path']}: level {state['level']}, "
                    f"{state['epoch_in_level']} epochs into it.",
                    flush=True,
                )
        if state["level"] < num_levels:
            checkpointer = checkpoint.Checkpointer(
                directory,
                config.epochs_per_level,
                epochs=state["epochs"],
                train_seconds=state["train_seconds"],
            )
            elsa_tf.fit(
                model,
                data.train(config.batch_size, seed=config.seed, augment=config.augment),
                epochs_per_level=config.epochs_per_level,
                optimizer=optimizers.factory(
                    config.optimizer, config.learning_rate, config.weight_decay
                ),
                loss=_LOSS,
                metrics=["accuracy"],
                levels=list(range(state["level"], num_levels)),
                initial_epoch=state["epoch_in_level"],
                recalibration_data=recalibration_data,
                shuffle=False,  # the pipeline shuffles, seeded
                validation_data=data.test(max(config.batch_size, 256)),
                callbacks=[
                    progress.LevelProgress(
                        os.path.join(workdir, "tensorboard"), verbose=bool(verbose)
                    ),
                    checkpointer,
                ],
                verbose=verbose,
            )
            seconds = checkpointer.train_seconds
        else:
            seconds = state["train_seconds"]
    model.save(os.path.join(workdir, "model.keras"))
    return model, float(seconds)


def evaluate(model, x, y, batch_size: int = 500) -> list[float]:
    """Top-1 test accuracy of every level, with Keras."""
    accuracies = []
    for level in range(len(elsa_tf.summary(model))):
        # Called eagerly: `predict` would trace a function per extracted model.
        extracted = elsa_tf.extract(model, level)
        correct = 0
        for start in range(0, len(x), batch_size):
            logits = extracted(x[start : start + batch_size], training=False)
            predicted = keras.ops.convert_to_numpy(logits).argmax(axis=-1)
            correct += int(np.sum(predicted == y[start : start + batch_size]))
        accuracies.append(correct / len(x))
    return accuracies


def export(config: Config, model, data, workdir: str) -> tuple[dict, list]:
    """Exports every level; returns the manifest and each level's latency (ms)."""
    from elsa_tf.lite import LevelRunner

    x_test, y_test = data.test_arrays()
    representative = None
    if config.quantization == "int8":
        representative = data.train_arrays(limit=256)[0]
    out_dir = os.path.join(workdir, "tflite")
    manifest = elsa_tf.export_tflite(
        model,
        out_dir,
        quantization=None if config.quantization == "float32" else config.quantization,
        representative_data=representative,
        evaluation_data=(x_test, y_test),
        overwrite=True,
    )
    runner = LevelRunner(out_dir, num_threads=1)
    latencies = [
        runner.load(row["level"])
        .latency(x_test[:1], repeats=_LATENCY_REPEATS)
        .median_ms
        for row in manifest["levels"]
    ]
    return manifest, latencies


def run_baseline(
    config: Config, data, workdir: str, verbose, recalibration_data
) -> list[dict]:
    """The independent tfmot baseline: one separately pruned model per level."""
    from elsa_tf.experiments import baseline

    return baseline.train_independent(
        lambda: zoo.build(
            config.model,
            data.input_shape,
            data.num_classes,
            backend="tf_keras",
            width=config.width,
        ),
        data,
        config.sparsities,
        epochs=config.epochs_per_level,
        batch_size=config.batch_size,
        optimizer=optimizers.factory(
            config.optimizer,
            config.learning_rate,
            config.weight_decay,
            backend="tf_keras",
        ),
        schedule=elsa_tf.LevelSchedule(config.schedule),
        seed=config.seed,
        workdir=workdir,
        verbose=verbose,
        augment=config.augment,
        recalibration_data=recalibration_data,
    )


def train_and_evaluate(
    config: Config, workdir, *, resume: bool = False, verbose="auto"
) -> dict:
    """Runs training, evaluation, export and the baseline; writes the report.

    Args:
        config: the run's settings.
        workdir: the run's directory (created if needed).
        resume: continue the run in `workdir` from its last checkpoint (with
            the same settings); without it, a previous run's outputs there are
            replaced.
        verbose: Keras's `verbose` for training (progress bars: `"auto"`/1).

    Returns:
        The report, as written to `report.json`.

    Raises:
        ValueError: when resuming with settings other than the run's.
    """
    workdir = os.fspath(workdir)
    config = config.resolved()
    _prepare_workdir(config, workdir, resume)
    keras.utils.set_random_seed(config.seed)
    data = datasets.load(config.dataset, data_dir=config.data_dir, seed=config.seed)
    recalibration_data = _recalibration_data(config, data)
    model, seconds = train(
        config,
        workdir,
        data,
        resume=resume,
        verbose=verbose,
        recalibration_data=recalibration_data,
    )

    x_test, y_test = data.test_arrays()
    accuracies = evaluate(model, x_test, y_test)
    manifest, latencies = None, None
    if config.export_tflite:
        manifest, latencies = export(config, model, data, workdir)
    baseline_rows = None
    if config.baseline == "independent":
        baseline_rows = run_baseline(config, data, workdir, verbose, recalibration_data)

    levels = []
    for row in elsa_tf.summary(model):
        k = row["level"]
        file_row = manifest["levels"][k] if manifest else {}
        levels.append(
            {
                "level": k,
                "target_sparsity": row["target_sparsity"],
                "achieved_sparsity": row["achieved_sparsity"],
                "accuracy": accuracies[k],
                "tflite_accuracy": file_row.get("accuracy"),
                "tflite_bytes": file_row.get("bytes"),
                "latency_ms": latencies[k] if latencies else None,
                "baseline": None
                if baseline_rows is None
                else {
                    key: baseline_rows[k][key]
                    for key in (
                        "achieved_sparsity",
                        "accuracy",
                        "tflite_bytes",
                        "train_seconds",
                    )
                },
            }
        )
    bundle = (manifest or {}).get("bundle")
    report = {
        "config": config.to_dict(),
        "dataset": config.dataset,
        "model": config.model,
        "runtime": manifest["runtime_checked"] if manifest else None,
        "levels": levels,
        "training_seconds": {
            "elsa": seconds,
            "baseline": None
            if baseline_rows is None
            else float(sum(r["train_seconds"] for r in baseline_rows)),
        },
        "storage_bytes": {
            "elsa_bundle": bundle["bytes"] if bundle else None,
            "elsa_levels": sum(r["bytes"] for r in manifest["levels"])
            if manifest
            else None,
            "baseline_models": None
            if baseline_rows is None
            else int(sum(r["tflite_bytes"] for r in baseline_rows)),
        },
    }
    report_lib.write(workdir, report)
    return report
