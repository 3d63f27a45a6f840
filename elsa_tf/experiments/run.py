"""`train_and_evaluate(config, workdir)`: one training run, start to report.

It embeds the zoo model, trains every level with `elsa_tf.fit` (a checkpoint
after every epoch; `resume=True` continues from the last one, mid-level
included), evaluates every level, exports them to TFLite and times them with
the TFLite runtime, trains the baselines asked for, and writes `report.md`,
`report.json` and `report.png` into `workdir`.

Before it writes anything, `prepare` checks what can go wrong with the disk
and the environment: `workdir` is not a directory, holds a previous run
(refused without `resume` or `overwrite`), or holds nothing to resume; an
optional package the run needs is missing; the data is not prepared. Each
raises `SetupError` with a one-line message.

Layout of `workdir`: `config.json` (the resolved configuration),
`checkpoints/`, `tensorboard/level_<k>/`, `model.keras` (the trained embedded
model), `tflite/` (the export and its manifest), `baseline/` (the tfmot
baseline's TFLite files), `baseline_elsa/` (the single-level elsa_tf
baseline's exports) and the three report files.
"""

from __future__ import annotations

import os
import shutil
import warnings

import keras
import numpy as np
import tensorflow as tf

import elsa_tf
from elsa_tf.experiments import (
    checkpoint,
    datasets,
    optimizers,
    progress,
    startup,
    zoo,
)
from elsa_tf.experiments import config as config_lib
from elsa_tf.experiments import report as report_lib
from elsa_tf.experiments.config import Config

CONFIG_FILE = "config.json"
# Outputs of a previous run, which a new run refuses or, with overwrite,
# replaces.
_RUN_OUTPUTS = (
    CONFIG_FILE,
    "checkpoints",
    "tensorboard",
    "tflite",
    "baseline",
    "baseline_elsa",
    "model.keras",
    "report.json",
    "report.md",
    "report.png",
)
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


class SetupError(ValueError):
    """A run that cannot start, found before anything is written (one line)."""


def saved_config(workdir) -> Config:
    """The settings of the run in `workdir`, to resume it.

    Raises:
        SetupError: `workdir` holds no readable `config.json`.
    """
    path = os.path.join(os.fspath(workdir), CONFIG_FILE)
    if not os.path.isfile(path):
        raise SetupError(
            f"Nothing to resume in --workdir={workdir!r}: it holds no {CONFIG_FILE} "
            "from an earlier run. Start the run without --resume."
        )
    try:
        return Config.load(path)
    except (OSError, ValueError, TypeError) as e:
        raise SetupError(f"Cannot resume from {path}: {e}") from None


def _check_workdir(workdir: str) -> None:
    path = os.path.abspath(workdir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise SetupError(
            f"--workdir must be a directory, and {path} is a file. "
            f"Received: --workdir={workdir!r}"
        )


def _check_extras(config: Config) -> None:
    needed = config_lib.required_modules(config)
    missing = startup.missing_extras(needed)
    if missing:
        why = ", ".join(
            f"{startup.PACKAGES.get(m, m)} ({needed[m]})"
            for m in needed
            if startup.PACKAGES.get(m, m) in missing
        )
        raise SetupError(
            f"This run needs {why}, not installed. Install the training "
            f"program's extra: {startup.EXTRA_INSTALL}"
        )


def _previous_outputs(workdir: str) -> list[str]:
    if not os.path.isdir(workdir):
        return []
    return [n for n in _RUN_OUTPUTS if os.path.lexists(os.path.join(workdir, n))]


def _check_resumable(config: Config, workdir: str) -> None:
    saved = saved_config(workdir)
    changed = {
        k: (v, getattr(config, k))
        for k, v in saved.to_dict().items()
        if v != config.to_dict()[k]
    }
    if changed:
        details = ", ".join(
            f"{k}={new!r} (the run has {old!r})" for k, (old, new) in changed.items()
        )
        raise SetupError(
            f"Cannot resume the run in {workdir} with other settings. "
            f"Received: {details}"
        )


def _load_data(config: Config):
    try:
        return datasets.load(config.dataset, data_dir=config.data_dir, seed=config.seed)
    except (FileNotFoundError, ValueError) as e:
        raise SetupError(str(e)) from None


def prepare(
    config: Config, workdir, *, resume: bool = False, overwrite: bool = False
) -> tuple[Config, datasets.Dataset]:
    """Checks that the run can start, loads its data, then sets up `workdir`.

    Every check comes before the first write: a run that cannot start leaves
    the disk as it was.

    Returns:
        The resolved config (saved as `workdir/config.json`) and the data.

    Raises:
        SetupError: `workdir` is not a directory; it holds a previous run and
            neither `resume` nor `overwrite` is given; `resume` finds no run
            there or other settings; an optional package the run needs is not
            installed; the data cannot be loaded.
    """
    workdir = os.fspath(workdir)
    config = config.resolved()
    if resume and overwrite:
        raise SetupError(
            "--resume continues the run in --workdir and --overwrite replaces "
            "it: give one of them."
        )
    _check_workdir(workdir)
    _check_extras(config)
    if resume:
        _check_resumable(config, workdir)
    elif not overwrite:
        previous = _previous_outputs(workdir)
        if previous:
            raise SetupError(
                f"--workdir={workdir!r} holds a previous run ({', '.join(previous)}): "
                "pass --resume to continue it, --overwrite to replace it, or "
                "another --workdir."
            )
    keras.utils.set_random_seed(config.seed)
    data = _load_data(config)
    os.makedirs(workdir, exist_ok=True)
    if overwrite and _previous_outputs(workdir):
        previous = _previous_outputs(workdir)
        print(f"Replacing the previous run in {workdir}: {', '.join(previous)}")
        for name in previous:
            target = os.path.join(workdir, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            else:
                os.remove(target)
    config.save(os.path.join(workdir, CONFIG_FILE))
    return config, data


def _build(config: Config, data) -> keras.Model:
    base = zoo.build(
        config.model, data.input_shape, data.num_classes, width=config.width
    )
    return elsa_tf.embed(
        base,
        config.sparsities,
        sparsifier=config.sparsifier,
        selection=config.selection,
        granularity=config.granularity,
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
                where = (
                    f"level {state['level']} of {num_levels}, "
                    f"{state['epoch_in_level']} of "
                    f"{config.level_epochs()[state['level']]} epochs into it"
                    if state["level"] < num_levels
                    else f"all {num_levels} levels trained"
                )
                print(f"Resuming from {state['path']}: {where}.", flush=True)
        if state["level"] < num_levels:
            sieving = None
            if config.sieving_share and state["epochs"] and "sieve" not in state:
                warnings.warn(
                    "The checkpoint holds no data-sieving state (saved by an "
                    "older elsa_tf): the sieve starts afresh, with another "
                    "held-out set than the run had.",
                    stacklevel=2,
                )
            if config.sieving_share:
                # Resumed from the checkpoint's queue and forgetting counts.
                sieving = elsa_tf.SievingCallback(
                    elsa_tf.DataSieve(
                        config.sieving_share, config.sieving_interval, seed=config.seed
                    ),
                    state=state.get("sieve"),
                )
            checkpointer = checkpoint.Checkpointer(
                directory,
                epochs=state["epochs"],
                train_seconds=state["train_seconds"],
                examples=state.get("examples_per_epoch"),
                flops_saved=state.get("flops_saved_per_epoch"),
                sieve=sieving,
            )
            elsa_tf.fit(
                model,
                data.train_examples()
                if sieving
                else data.train(
                    config.batch_size, seed=config.seed, augment=config.augment
                ),
                epochs_per_level=config.epochs_per_level,
                optimizer=optimizers.factory(
                    config.optimizer, config.learning_rate, config.weight_decay
                ),
                loss=_LOSS,
                metrics=["accuracy"],
                levels=list(range(state["level"], num_levels)),
                initial_epoch=state["epoch_in_level"],
                recalibration_data=recalibration_data,
                sieving=sieving,
                layer_freezing=elsa_tf.LayerFreezing(
                    config.freeze_share, config.freeze_interval
                )
                if config.freeze_share
                else None,
                # The pipeline shuffles, seeded; a sieve shuffles its examples.
                shuffle=bool(sieving),
                **({"batch_size": config.batch_size} if sieving else {}),
                validation_data=data.test(max(config.batch_size, 256)),
                callbacks=[
                    progress.LevelProgress(os.path.join(workdir, "tensorboard")),
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
        # The report sets each level's file size beside the baselines' files,
        # which are stored sparse: so are these, where that is smaller and
        # not slower (export_tflite's storage choice).
        sparse_encoding=True,
        # What datasets.load does to raw inputs, so the device can do it too:
        # float32 = raw * scale. sklearn's digits are 0-16; tfds and .npz
        # uint8 images are 0-255; MNIST-1D and float .npz arrays are used
        # as stored (scale 1).
        preprocessing={
            "dataset": config.dataset,
            "dtype": "float32",
            "layout": {1: "NC", 2: "NWC", 3: "NHWC"}.get(len(data.input_shape)),
            "scale": 1 / 16
            if config.dataset == "digits"
            else 1 / 255
            if config.dataset in datasets.TFDS_NAMES
            or (
                config.dataset not in datasets.DATASETS
                and np.load(config.dataset)["x_test"].dtype == np.uint8
            )
            else 1.0,
        },
    )
    runner = LevelRunner(out_dir, num_threads=1)
    latencies = [
        runner.load(row["level"])
        .latency(x_test[:1], repeats=_LATENCY_REPEATS)
        .median_ms
        for row in manifest["levels"]
    ]
    return manifest, latencies


def _baseline_header(config: Config, name: str, level: int, target: float):
    print(
        f"Baseline {name}, model {level + 1} of {len(config.sparsities)}: "
        f"target sparsity {target:.2%}; {config_lib.method(name, config)}",
        flush=True,
    )


def run_baselines(
    config: Config, data, workdir: str, verbose, recalibration_data
) -> dict[str, list[dict]]:
    """The baselines of `config.baseline`: one separate model per level each."""
    from elsa_tf.experiments import baseline

    rows = {}
    for name in config.baseline:
        backend = "tf_keras" if name == "independent" else "keras"
        common = dict(
            build=lambda backend=backend: zoo.build(
                config.model,
                data.input_shape,
                data.num_classes,
                backend=backend,
                width=config.width,
            ),
            dataset=data,
            sparsities=config.sparsities,
            # As long as ELSA's longest level (its sparsest, for a front-loaded
            # budget): each baseline model trains from scratch.
            epochs=max(config.level_epochs()),
            batch_size=config.batch_size,
            optimizer=optimizers.factory(
                config.optimizer,
                config.learning_rate,
                config.weight_decay,
                backend=backend,
            ),
            schedule=elsa_tf.LevelSchedule(config.schedule),
            seed=config.seed,
            workdir=workdir,
            verbose=verbose,
            augment=config.augment,
            recalibration_data=recalibration_data,
            on_start=_header(config, name) if verbose else None,
        )
        if name == "independent":
            rows[name] = baseline.train_independent(**common)
        else:
            rows[name] = baseline.train_independent_elsa(
                **common,
                sparsifier=config.sparsifier,
                selection=config.selection,
                granularity=config.granularity,
                shared=config.shared,
            )
    return rows


def _header(config: Config, name: str):
    return lambda level, target: _baseline_header(config, name, level, target)


def train_and_evaluate(
    config: Config,
    workdir,
    *,
    resume: bool = False,
    overwrite: bool = False,
    verbose="auto",
) -> dict:
    """Runs training, evaluation, export and the baselines; writes the report.

    Args:
        config: the run's settings.
        workdir: the run's directory (created if needed).
        resume: continue the run in `workdir` from its last checkpoint (with
            the same settings).
        overwrite: replace a previous run's outputs in `workdir`; without it
            (or `resume`), a previous run there is refused.
        verbose: Keras's `verbose` for training (progress bars: `"auto"`/1).

    Returns:
        The report, as written to `report.json`.

    Raises:
        SetupError: before anything is written, when the run cannot start
            (see `prepare`), e.g. when resuming with other settings.
    """
    workdir = os.fspath(workdir)
    config, data = prepare(config, workdir, resume=resume, overwrite=overwrite)
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
        # The converter and the TFLite runtime log to stderr from C++ (shown
        # if the export fails).
        with startup.captured_stderr():
            manifest, latencies = export(config, model, data, workdir)
    baseline_rows = run_baselines(config, data, workdir, verbose, recalibration_data)

    levels = []
    for row in elsa_tf.summary(model):
        k = row["level"]
        file_row = manifest["levels"][k] if manifest else {}
        levels.append(
            {
                "level": k,
                "target_sparsity": row["target_sparsity"],
                "achieved_sparsity": row["achieved_sparsity"],
                # At channel granularity the target is a share of channels.
                "achieved_channel_sparsity": row.get("achieved_channel_sparsity"),
                "accuracy": accuracies[k],
                "tflite_accuracy": file_row.get("accuracy"),
                "tflite_bytes": file_row.get("bytes"),
                "latency_ms": latencies[k] if latencies else None,
                "baselines": {
                    name: {
                        key: rows[k][key]
                        for key in (
                            "achieved_sparsity",
                            "accuracy",
                            "tflite_bytes",
                            "train_seconds",
                        )
                    }
                    for name, rows in baseline_rows.items()
                },
            }
        )
    bundle = (manifest or {}).get("bundle")
    last = checkpoint.latest(os.path.join(workdir, "checkpoints")) or {}
    report = {
        "config": config.to_dict(),
        "dataset": config.dataset,
        "num_train": data.num_train,
        "model": config.model,
        "runtime": manifest["runtime_checked"] if manifest else None,
        "methods": {
            name: config_lib.method(name, config) for name in ("elsa", *baseline_rows)
        },
        "levels": levels,
        # Examples trained on in each epoch, under data sieving, and the
        # share of each epoch's training FLOPs saved, under layer freezing.
        "examples_per_epoch": last.get("examples_per_epoch") or None,
        "flops_saved_per_epoch": last.get("flops_saved_per_epoch") or None,
        "training_seconds": {
            "elsa": seconds,
            "baselines": {
                name: float(sum(r["train_seconds"] for r in rows))
                for name, rows in baseline_rows.items()
            },
        },
        "storage_bytes": {
            "elsa_bundle": bundle["bytes"] if bundle else None,
            "elsa_levels": sum(r["bytes"] for r in manifest["levels"])
            if manifest
            else None,
            "baselines": {
                name: int(sum(r["tflite_bytes"] for r in rows))
                for name, rows in baseline_rows.items()
            },
        },
    }
    report_lib.write(workdir, report)
    return report
