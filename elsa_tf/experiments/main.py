"""The `elsa-train` command line: absl flags over `run.train_and_evaluate`.

Every flag is checked when the flags are parsed, by the same checks as
`Config`, so a bad value stops the program at start-up with one line naming
the flag and the value it received. What can only be checked against the
disk (the work directory, a missing optional package, data that is not
prepared, a resume with other settings) is checked before anything is
written, and stops the program with one line too. Ctrl-C stops it with one
line saying where and the command that continues the run.
"""

from __future__ import annotations

import os
import shlex
import sys

# Before anything imports TensorFlow (the flags' checks do).
from elsa_tf.experiments import startup

startup.import_tensorflow_quietly()

from absl import app, flags, logging  # noqa: E402

from elsa_tf import layer_freezing, sieving  # noqa: E402
from elsa_tf.experiments import checkpoint, datasets, optimizers, zoo  # noqa: E402
from elsa_tf.experiments import config as config_lib  # noqa: E402

USAGE = """Trains an embedded ELSA model, evaluates, exports and reports every level.

    elsa-train
    elsa-train --dataset=mnist1d --sparsities=0.9,0.5,0.0 --workdir=/tmp/elsa_1d
    elsa-train --workdir=/tmp/elsa_1d --resume      # after Ctrl-C
    elsa-train --overwrite                          # replace the previous run

--helpfull also lists absl's and TensorFlow's flags.
"""
# Exit status after Ctrl-C: 128 + SIGINT, as a shell reports it.
_INTERRUPTED = 130

FLAGS = flags.FLAGS
_D = config_lib.Config()  # the defaults

flags.DEFINE_string(
    "workdir",
    "/tmp/elsa_train",
    "Directory for the run: config, checkpoints, TensorBoard logs, model, "
    "TFLite export and report. A previous run's outputs there are refused "
    "unless --resume (continue it) or --overwrite (replace them).",
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
flags.DEFINE_list(
    "epochs_per_level",
    [str(_D.epochs_per_level)],
    "Epochs per level (>= 1): one number for every level, or one per level, "
    "sparsest first (e.g. 6,3,3,3: elsa_tf.budgets.front_loaded).",
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
    "How each level is sparsified: gradual_magnitude (gradual magnitude "
    "pruning, Zhu & Gupta), dpf (Dynamic Pruning with Feedback, Lin et al.) or "
    "polarized_gates (trained channel gates with a polarization regularizer, "
    "Zhuang et al.; needs --granularity=channel and --selection=per_layer or "
    "global).",
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
    None,
    list(config_lib.SELECTIONS),
    "Rank weight magnitudes across all layers (global), within each layer "
    "(per_layer), or across all layers by layer-adaptive LAMP scores (lamp), "
    "which never empty a layer. Default: lamp, or per_layer for "
    "polarized_gates.",
)
flags.DEFINE_enum(
    "granularity",
    _D.granularity,
    list(config_lib.GRANULARITIES),
    "What a level keeps or drops: single weights (weight), or whole channels "
    "(channel), so that each level is a narrower dense network.",
)
flags.DEFINE_enum(
    "shared",
    None,  # the library's default for the granularity
    list(config_lib.SHARED_MODES),
    "Biases and normalization weights: all trained with level 0 then frozen "
    "(freeze); the same, but normalization statistics kept per level "
    "(per_level_statistics); or one copy of each per level (per_level). "
    "Unset: freeze, or per_level_statistics with --granularity=channel. "
    "per_level_statistics traces one training step for all levels, and with "
    "--epochs_per_level=6,3,3,3 (front_loaded) was measured best for a budget.",
)
flags.DEFINE_bool(
    "recalibrate_bn",
    _D.recalibrate_bn,
    "Re-estimate BatchNormalization statistics on training inputs at the end of "
    "every level (and of every baseline model), before freezing it.",
)
flags.DEFINE_bool("augment", _D.augment, "Standard augmentation (CIFAR only).")
flags.DEFINE_float(
    "sieving_share",
    _D.sieving_share,
    "SpFDE data sieving: share of the training set held out of each epoch, "
    "in [0, 1); 0 turns it off.",
)
flags.DEFINE_integer(
    "sieving_interval",
    _D.sieving_interval,
    "Epochs between data sieving swaps (>= 1).",
)
flags.DEFINE_float(
    "freeze_share",
    _D.freeze_share,
    "SpFDE layer freezing: share of each level's training FLOPs to save by "
    "freezing front blocks once its masks are final, in [0, 1); 0 turns it off.",
)
flags.DEFINE_integer(
    "freeze_interval",
    _D.freeze_interval,
    "Epochs between freezing one more front block (>= 1).",
)
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
flags.DEFINE_list(
    "baseline",
    list(_D.baseline) or [config_lib.NO_BASELINE],
    "Also train one separate model per level, with the same architecture, "
    "initial weights, epochs, optimizer and schedule, and compare: "
    "'independent' (tfmot's prune_low_magnitude on tf_keras, per-layer "
    "ranking), 'independent_elsa' (elsa_tf with a single level, ELSA's own "
    "sparsifier and selection), both (comma-separated), or none.",
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
    "resume",
    False,
    "Continue the run in --workdir from its last checkpoint, with the settings "
    "in its config.json (a flag given must match them).",
)
# Also defined, identically, by tools/export_tflite.py.
flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace a previous run's outputs in --workdir.",
    allow_override=True,
)
flags.DEFINE_enum(
    "verbose",
    "auto",
    ["auto", "0", "1", "2"],
    "Keras progress: bars (1), one line per epoch (2); auto: bars on a "
    "terminal, lines when the output is redirected.",
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
    "epochs_per_level": lambda v: config_lib.check_epochs_flag(v),
    "batch_size": _int("batch_size"),
    "sieving_share": lambda v: sieving.check_share(v),
    "sieving_interval": lambda v: sieving.check_interval(v),
    "freeze_share": lambda v: layer_freezing.check_share(v),
    "freeze_interval": lambda v: layer_freezing.check_interval(v),
    "learning_rate": _number("learning_rate", low=0.0, low_open=True),
    "weight_decay": _number("weight_decay", low=0.0, low_open=False),
    "baseline": config_lib.check_baselines,
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


def _cross_check(names: list[str], message: str, check) -> None:
    """Registers a validator of flags that must agree, raising `check`'s
    ValueError (which names the values) as absl's one-line error."""

    @flags.multi_flags_validator(names, message=message)
    def validate(values):
        try:
            check(*(values[name] for name in names))
        except ValueError as e:
            raise flags.ValidationError(str(e)) from None
        return True


_cross_check(
    ["epochs_per_level", "sparsities"],
    "--epochs_per_level needs one entry per level of --sparsities.",
    config_lib.check_epochs_fit_levels,
)
_cross_check(
    ["sparsifier", "selection", "granularity"],
    "--sparsifier does not take these settings.",
    config_lib.check_sparsifier_options,
)
_cross_check(
    ["optimizer", "learning_rate", "weight_decay"],
    "--optimizer does not take these settings.",
    config_lib.check_optimizer,
)


def config_from_flags(base: config_lib.Config | None = None) -> config_lib.Config:
    """The run's settings: the flags, or `base` where a flag was not given."""
    values = {
        "dataset": FLAGS.dataset,
        "data_dir": FLAGS.data_dir,
        "model": FLAGS.model,
        "width": FLAGS.width,
        "sparsities": tuple(float(s) for s in FLAGS.sparsities),
        "epochs_per_level": config_lib.check_epochs_flag(FLAGS.epochs_per_level),
        "batch_size": FLAGS.batch_size,
        "optimizer": FLAGS.optimizer,
        "learning_rate": FLAGS.learning_rate,
        "weight_decay": FLAGS.weight_decay,
        "sparsifier": FLAGS.sparsifier,
        "schedule": FLAGS.schedule,
        "selection": FLAGS.selection,
        "granularity": FLAGS.granularity,
        "shared": FLAGS.shared,
        "recalibrate_bn": FLAGS.recalibrate_bn,
        "augment": FLAGS.augment,
        "sieving_share": FLAGS.sieving_share,
        "sieving_interval": FLAGS.sieving_interval,
        "freeze_share": FLAGS.freeze_share,
        "freeze_interval": FLAGS.freeze_interval,
        "export_tflite": FLAGS.export_tflite,
        "quantization": FLAGS.quantization,
        "baseline": FLAGS.baseline,
        "distribution": FLAGS.distribution,
        "seed": FLAGS.seed,
    }
    if base is None:
        return config_lib.Config(**values)
    given = {k: v for k, v in values.items() if FLAGS[k].present}
    if given.get("model") == config_lib.AUTO:
        given.pop("model")  # the saved config holds the model "auto" chose
    return config_lib.Config(**{**base.to_dict(), **given})


def _program() -> str:
    """How the user started this program, for the commands it suggests."""
    name = sys.argv[0]
    if name.endswith(".py"):
        return f"python {shlex.quote(name)}"
    return os.path.basename(name)


def _stopped_at(workdir: str, config: config_lib.Config) -> str:
    """Where an interrupted run stands, from its last checkpoint."""
    try:
        state = checkpoint.latest(os.path.join(workdir, "checkpoints"))
    except (OSError, ValueError):
        state = None
    num_levels = len(config.sparsities)
    if state is None:
        return "before its first checkpoint (level 0, epoch 0)"
    if state["level"] >= num_levels:
        return (
            f"after training all {num_levels} levels (in evaluation, export, "
            "a baseline or the report)"
        )
    return (
        f"in level {state['level']} of {num_levels}, after epoch "
        f"{state['epoch_in_level']} of {config.level_epochs()[state['level']]}"
    )


def _fail(message: str) -> None:
    """Stops the program with one line, as absl does for a bad flag."""
    print(f"FATAL {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from elsa_tf.experiments import run

    if not FLAGS["verbosity"].present:
        # The TFLite converter logs every step at INFO; -v 0 shows it again.
        logging.set_verbosity(logging.WARNING)
    verbose = FLAGS.verbose
    if verbose == "auto":
        # Progress bars rewrite their line with \r and ANSI codes: in a log
        # file that is noise, one line per epoch is not.
        verbose = 1 if sys.stdout.isatty() else 2
    workdir = FLAGS.workdir
    config = None
    try:
        # --resume takes the run's settings from its config.json; a flag given
        # with it must agree with them.
        saved = run.saved_config(workdir) if FLAGS.resume else None
        config = config_from_flags(saved)
        report = run.train_and_evaluate(
            config,
            workdir,
            resume=FLAGS.resume,
            overwrite=FLAGS.overwrite,
            verbose=int(verbose),
        )
    except run.SetupError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        where = "" if config is None else f" {_stopped_at(workdir, config)}"
        print(
            f"\nInterrupted{where}. Continue with: {_program()} "
            f"--workdir={shlex.quote(workdir)} --resume (the other settings are "
            "read from its config.json)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(_INTERRUPTED)
    from elsa_tf.experiments import report as report_lib

    print()
    print(report_lib.render_markdown(report))
    print(f"Outputs in {os.path.abspath(workdir)}")


def _declare_help() -> None:
    """Makes --help and --helpshort list this program's flags.

    absl lists the key flags of the main module, which it names by
    `sys.argv[0]`; the console script's main module defines none.
    """
    for flag in FLAGS.get_key_flags_for_module(sys.modules[__name__]):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    main_module = sys.modules["__main__"]
    if not main_module.__doc__:
        main_module.__doc__ = USAGE


def run():
    """The `elsa-train` console script (and `python examples/train.py`)."""
    _declare_help()
    app.run(main)
