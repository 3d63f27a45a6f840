"""The `elsa-train` command line: absl flags over `run.train_and_evaluate`.

Every flag is checked when the flags are parsed, by the same checks as
`Config`, so a bad value stops the program at start-up with one line naming
the flag and the value it received.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from elsa_tf.experiments import config as config_lib  # noqa: E402
from elsa_tf.experiments import datasets, optimizers, zoo  # noqa: E402

FLAGS = flags.FLAGS
_D = config_lib.Config()  # the defaults

flags.DEFINE_string(
    "workdir",
    "/tmp/elsa_train",
    "Directory for the run: config, checkpoints, TensorBoard logs, model, "
    "TFLite export and report. A run that is not --resume'd replaces a "
    "previous run's outputs there.",
)
flags.DEFINE_string(
    "dataset",
    _D.dataset,
    f"One of {', '.join(datasets.DATASETS)}, or a path to a .npz file with "
    "x_train, y_train, x_test, y_test. digits ships with scikit-learn; the "
    "tensorflow-datasets ones are read from --data_dir, never downloaded.",
)
flags.DEFINE_string(
    "data_dir", None, "tensorflow-datasets data directory (tfds's default if unset)."
)
flags.DEFINE_enum(
    "model",
    _D.model,
    [config_lib.AUTO, *zoo.MODELS],
    "Zoo model; 'auto' picks the dataset's usual one (digits: cnn, mnist and "
    "fashion_mnist: lenet5, cifar: resnet20, mnist1d: cnn1d, .npz: mlp).",
)
flags.DEFINE_float(
    "width", _D.width, "Width multiplier of the model's hidden layers (> 0)."
)
flags.DEFINE_list(
    "sparsities",
    [str(s) for s in _D.sparsities],
    "Level sparsities in [0, 1), strictly decreasing: level 0 is the sparsest.",
)
flags.DEFINE_integer(
    "epochs_per_level", _D.epochs_per_level, "Epochs per level (>= 1)."
)
flags.DEFINE_integer("batch_size", _D.batch_size, "Training batch size (>= 1).")
flags.DEFINE_enum(
    "optimizer",
    _D.optimizer,
    list(optimizers.OPTIMIZERS),
    "Optimizer, fresh at each level (sgd has momentum 0.9).",
)
flags.DEFINE_float("learning_rate", _D.learning_rate, "Learning rate (> 0).")
flags.DEFINE_float(
    "weight_decay", _D.weight_decay, "Decoupled weight decay (>= 0; adamw, sgd)."
)
flags.DEFINE_enum(
    "sparsifier",
    _D.sparsifier,
    list(config_lib.SPARSIFIERS),
    "How each level is sparsified: gradual magnitude pruning (Zhu & Gupta).",
)
flags.DEFINE_enum(
    "schedule",
    _D.schedule,
    list(config_lib.SCHEDULES),
    "tfmot pruning schedule inside each level: PolynomialDecay to the level's "
    "sparsity over its first 75%, or ConstantSparsity.",
)
flags.DEFINE_enum(
    "selection",
    _D.selection,
    list(config_lib.SELECTIONS),
    "Rank weight magnitudes across all layers (global) or within each layer.",
)
flags.DEFINE_enum(
    "shared",
    _D.shared,
    list(config_lib.SHARED_MODES),
    "Biases and normalization weights: trained with level 0 then frozen, or "
    "one copy per level.",
)
flags.DEFINE_bool(
    "recalibrate_bn",
    _D.recalibrate_bn,
    "Re-estimate BatchNormalization statistics on training inputs at the end of "
    "every level (and of every baseline model), before freezing it.",
)
flags.DEFINE_bool("augment", _D.augment, "Standard augmentation (CIFAR only).")
flags.DEFINE_bool(
    "export_tflite", _D.export_tflite, "Export every level and a bundle to TFLite."
)
# Also defined, identically, by tools/export_tflite.py, which the tests
# import into the same process.
flags.DEFINE_enum(
    "quantization",
    "float32",
    config_lib.QUANTIZATIONS,
    "TFLite quantization of the export.",
    allow_override=True,
)
flags.DEFINE_enum(
    "baseline",
    _D.baseline,
    list(config_lib.BASELINES),
    "'independent' also trains one model per level with tfmot's "
    "prune_low_magnitude on tf_keras, same architecture, epochs and optimizer.",
)
flags.DEFINE_enum(
    "distribution",
    _D.distribution,
    list(config_lib.DISTRIBUTIONS),
    "tf.distribute strategy: none, or MirroredStrategy over the local devices.",
)
flags.DEFINE_integer(
    "seed", _D.seed, "Random seed (>= 0): split, weights, data order.", lower_bound=0
)
flags.DEFINE_bool(
    "resume", False, "Continue the run in --workdir from its last checkpoint."
)
flags.DEFINE_enum(
    "verbose", "auto", ["auto", "0", "1", "2"], "Keras progress: bars (1), lines (2)."
)


def _validator(check):
    def validate(value):
        try:
            check(value)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from None
        return True

    return validate


def _number(name, **bounds):
    return lambda v: config_lib.check_float(name, v, **bounds)


def _int(name):
    return lambda v: config_lib.check_positive_int(name, v)


for _name, _check in {
    "dataset": config_lib.check_dataset,
    "width": _number("width", low=0.0, low_open=True),
    "sparsities": config_lib.check_sparsities,
    "epochs_per_level": _int("epochs_per_level"),
    "batch_size": _int("batch_size"),
    "learning_rate": _number("learning_rate", low=0.0, low_open=True),
    "weight_decay": _number("weight_decay", low=0.0, low_open=False),
}.items():
    flags.register_validator(_name, _validator(_check))


@flags.multi_flags_validator(
    ["model", "dataset"], message="--model does not fit --dataset."
)
def _model_fits_dataset(values):
    try:
        config_lib.check_dataset(values["dataset"])
    except ValueError:
        return True  # --dataset's own validator reports it.
    try:
        config_lib.check_model_fits_dataset(values["model"], values["dataset"])
    except ValueError as e:
        raise flags.ValidationError(str(e)) from None
    return True


@flags.multi_flags_validator(
    ["optimizer", "learning_rate", "weight_decay"],
    message="--optimizer does not take these settings.",
)
def _optimizer_takes_settings(values):
    try:
        config_lib.check_optimizer(
            values["optimizer"], values["learning_rate"], values["weight_decay"]
        )
    except ValueError as e:
        raise flags.ValidationError(str(e)) from None
    return True


def config_from_flags() -> config_lib.Config:
    return config_lib.Config(
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        model=FLAGS.model,
        width=FLAGS.width,
        sparsities=tuple(float(s) for s in FLAGS.sparsities),
        epochs_per_level=FLAGS.epochs_per_level,
        batch_size=FLAGS.batch_size,
        optimizer=FLAGS.optimizer,
        learning_rate=FLAGS.learning_rate,
        weight_decay=FLAGS.weight_decay,
        sparsifier=FLAGS.sparsifier,
        schedule=FLAGS.schedule,
        selection=FLAGS.selection,
        shared=FLAGS.shared,
        recalibrate_bn=FLAGS.recalibrate_bn,
        augment=FLAGS.augment,
        export_tflite=FLAGS.export_tflite,
        quantization=FLAGS.quantization,
        baseline=FLAGS.baseline,
        distribution=FLAGS.distribution,
        seed=FLAGS.seed,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from elsa_tf.experiments import report as report_lib
    from elsa_tf.experiments import run

    if not FLAGS["verbosity"].present:
        # The TFLite converter logs every step at INFO; -v 0 shows it again.
        logging.set_verbosity(logging.WARNING)
    verbose = FLAGS.verbose if FLAGS.verbose == "auto" else int(FLAGS.verbose)
    report = run.train_and_evaluate(
        config_from_flags(), FLAGS.workdir, resume=FLAGS.resume, verbose=verbose
    )
    print()
    print(report_lib.render_markdown(report))
    print(f"Outputs in {os.path.abspath(FLAGS.workdir)}")


def run():
    """The `elsa-train` console script."""
    app.run(main)
